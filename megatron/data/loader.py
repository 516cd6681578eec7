"""Serving micro-batches to one data-parallel rank, positioned by consumed samples.

Global batch k is dataset samples [k*G, (k+1)*G). It is cut into gradient-accumulation
micro-steps of micro*dp samples, and data-parallel rank r takes slice [r*micro, (r+1)*micro) of
each (Megatron's pretraining sampler). The position is a pure function of the number of samples
consumed, so a resumed run serves exactly what an uninterrupted run would have.

Datasets come in two kinds, and the dataset object says which: random-access ones (GPTDataset,
BlendedDataset: ``len`` and ``[i]``) are indexed directly, so a rank reads only its own samples;
sequential ones (StreamingDataset) expose ``iter_samples(start)`` instead, and every rank walks
the stream and keeps its slice of each micro-step chunk. Both serve the same samples to the same
rank for the same ``consumed_samples``.

With ``mask_token`` (eod_mask_loss: the tokenizer's end-of-document id) every label whose input
token is it becomes ``IGNORE``: as in GPT-NeoX, the prediction made from an end-of-document token
(the first token of the next, unrelated document) is left out of the loss.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]

IGNORE = -1
"""Label of a position left out of the loss (megatron/model/loss.py's masked loss skips it)."""


def micro_batches(
    dataset: Sequence[np.ndarray], consumed_samples: int, micro_batch: int, dp_size: int, dp_rank: int,
    mask_token: int | None = None,
) -> Iterator[Batch]:
    """Endless (tokens, labels) micro-batches for this rank, starting after `consumed_samples`."""
    iter_samples = getattr(dataset, "iter_samples", None)
    if iter_samples is not None:
        for batch in _sequential_micro_batches(iter_samples(consumed_samples), micro_batch, dp_size, dp_rank):
            yield _mask(batch, mask_token)
        return
    step = micro_batch * dp_size
    start = consumed_samples + dp_rank * micro_batch
    while True:
        if start + micro_batch > len(dataset):
            raise RuntimeError(
                f"the dataset has {len(dataset)} samples but sample {start + micro_batch - 1} was "
                "requested: build it with more samples (train_iters x train_batch_size)"
            )
        yield _mask(_to_batch([dataset[i] for i in range(start, start + micro_batch)]), mask_token)
        start += step


def _to_batch(samples: list[np.ndarray]) -> Batch:
    data = torch.from_numpy(np.stack(samples).astype(np.int64))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def _mask(batch: Batch, mask_token: int | None) -> Batch:
    tokens, labels = batch
    if mask_token is None:
        return batch
    return tokens, labels.masked_fill(tokens == mask_token, IGNORE)


def _sequential_micro_batches(samples: Iterator[np.ndarray], micro_batch: int, dp_size: int, dp_rank: int
                              ) -> Iterator[Batch]:
    """Micro-step chunks of micro*dp consecutive samples; this rank keeps its slice of each."""
    lo, hi = dp_rank * micro_batch, (dp_rank + 1) * micro_batch
    while True:
        chunk = [next(samples) for _ in range(micro_batch * dp_size)]
        yield _to_batch(chunk[lo:hi])


def eval_batches(dataset: Sequence[np.ndarray], micro_batch: int, dp_size: int, dp_rank: int,
                 mask_token: int | None = None) -> Iterator[Batch]:
    """Every evaluation reads the same first samples of its split, so evals are comparable."""
    return micro_batches(dataset, 0, micro_batch, dp_size, dp_rank, mask_token)
