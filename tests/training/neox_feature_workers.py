"""Bodies of the partition_activations test; each runs on both ranks of a gloo group (see
tests/training/test_neox_features.py)."""

from __future__ import annotations

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

from megatron.parallel.groups import ParallelGroups
from megatron.training.setup import _unlink_deepspeed_shm_buffer
from megatron.parallel.random import partitioned_checkpoint, seed_tp_rng, tp_rng


def partitioned_checkpoint_matches_plain(rank: int, world: int) -> None:
    """A layer with dropout on the tensor-parallel stream (masks differ between ranks), run
    through `partitioned_checkpoint` and plainly from the same weights, input and RNG states:
    the same output and gradients, while each rank kept 1/world of the input (gathered back once
    for the recompute)."""
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the group; DeepSpeed's own collectives need it
    _unlink_deepspeed_shm_buffer()  # as train.py does: no 66 MiB /dev/shm file left per rank
    groups = ParallelGroups(1, world, 1)
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def layer(t: torch.Tensor) -> torch.Tensor:
        with tp_rng():
            return F.dropout(t @ weight, p=0.5, training=True).tanh()

    gathered: list[int] = []
    gather = ds_checkpointing.gather_partitioned_activations

    def counting_gather(tensors, device=None):
        gathered.extend(t.numel() for t in tensors[::2])  # (partition, full size) pairs
        return gather(tensors, device=device)

    ds_checkpointing.gather_partitioned_activations = counting_gather
    try:
        results = []
        for run in (layer, lambda t: partitioned_checkpoint(groups)(layer, t)):
            seed_tp_rng(7, rank)
            x.grad = weight.grad = None
            out = run(x)
            out.square().sum().backward()  # DeepSpeed's checkpoint refuses autograd.grad
            results.append((out.detach(), x.grad, weight.grad))
    finally:
        ds_checkpointing.gather_partitioned_activations = gather
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    assert gathered == [x.numel() // world]
