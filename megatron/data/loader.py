"""Serving micro-batches to one data-parallel rank, positioned by consumed samples.

Global batch k is dataset samples [k*G, (k+1)*G). It is cut into gradient-accumulation
micro-steps of micro*dp samples, and data-parallel rank r takes slice [r*micro, (r+1)*micro) of
each (Megatron's pretraining sampler). The position is a pure function of the number of samples
consumed, so a resumed run serves exactly what an uninterrupted run would have.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def micro_batches(
    dataset: Sequence[np.ndarray], consumed_samples: int, micro_batch: int, dp_size: int, dp_rank: int,
) -> Iterator[Batch]:
    """Endless (tokens, labels) micro-batches for this rank, starting after `consumed_samples`."""
    step = micro_batch * dp_size
    start = consumed_samples + dp_rank * micro_batch
    while True:
        if start + micro_batch > len(dataset):
            raise RuntimeError(
                f"the dataset has {len(dataset)} samples but sample {start + micro_batch - 1} was "
                "requested: build it with more samples (train_iters x train_batch_size)"
            )
        samples = np.stack([dataset[i] for i in range(start, start + micro_batch)]).astype(np.int64)
        data = torch.from_numpy(samples)
        yield data[:, :-1].contiguous(), data[:, 1:].contiguous()
        start += step


def eval_batches(dataset: Sequence[np.ndarray], micro_batch: int, dp_size: int, dp_rank: int) -> Iterator[Batch]:
    """Every evaluation reads the same first samples of its split, so evals are comparable."""
    return micro_batches(dataset, 0, micro_batch, dp_size, dp_rank)
