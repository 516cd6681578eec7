"""Autograd-aware collectives for tensor and sequence parallelism.

Each op's backward is its dual: a forward identity whose inputs feed split computations must sum
the gradients (all-reduce), a forward all-reduce passes gradients through unchanged, a gather is
undone by a split, and a reduce-scatter by an all-gather. With one rank every op is the identity
and issues no collective, so the same model code runs unparallelised.

gloo has no reduce-scatter; there it is an all-reduce followed by taking this rank's chunk (the
same numbers, more bytes). NCCL uses the real reduce-scatter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.parallel.groups import TensorParallel

SEQ_DIM = 1  # activations are [batch, seq, hidden]


def _all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)
    return x


def _split(x: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    return x.chunk(tp.size, dim=dim)[tp.rank].contiguous()


def _gather(x: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    if dist.get_backend(tp.group) == "nccl" and dim == 0:
        out = torch.empty_like(x.chunk(tp.size, dim=0)[0])
        dist.reduce_scatter_tensor(out, x.contiguous(), group=tp.group)
        return out
    return _split(_all_reduce(x.clone(), tp), dim, tp)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x.clone(), tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _gather(x, -1, tp)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.tp), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _split(x, SEQ_DIM, tp)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQ_DIM, ctx.tp), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _gather(x, SEQ_DIM, tp)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM, ctx.tp), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _reduce_scatter(x, SEQ_DIM, tp)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQ_DIM, ctx.tp), None


def copy_to_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Forward identity, backward all-reduce: inputs of column-parallel layers, and parameters
    replicated across ranks that each see only part of the tokens (sequence parallel)."""
    return x if tp.size == 1 else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Forward all-reduce of partial sums (row-parallel outputs), backward identity."""
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp)


def gather_last_dim(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return x if tp.size == 1 else _GatherLast.apply(x, tp)


def scatter_to_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Keep this rank's slice of the sequence (entering a sequence-parallel region)."""
    return x if tp.size == 1 else _ScatterSeq.apply(x, tp)


def gather_from_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """All-gather the sequence before a column-parallel layer; backward reduce-scatters."""
    return x if tp.size == 1 else _GatherSeq.apply(x, tp)


def reduce_scatter_to_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum row-parallel partials and keep this rank's slice of the sequence."""
    return x if tp.size == 1 else _ReduceScatterSeq.apply(x, tp)


def enter_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The input of a column-parallel layer: gathered from sequence shards or copied."""
    return gather_from_sequence(x, tp) if tp.sequence_parallel else copy_to_tp(x, tp)


def leave_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Partial sums of row-parallel layers: reduce-scattered to sequence shards or all-reduced."""
    return reduce_scatter_to_sequence(x, tp) if tp.sequence_parallel else reduce_from_tp(x, tp)


def sequence_shared(param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """A replicated parameter used on sequence shards: its gradient must be summed over ranks."""
    return copy_to_tp(param, tp) if tp.sequence_parallel else param
