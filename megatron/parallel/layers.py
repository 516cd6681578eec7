"""Tensor-parallel building blocks. With one rank each is exactly its dense twin.

Initialisation draws the FULL weight from the layer's generator on every rank and keeps this
rank's slice, so any tensor-parallel layout starts from the same model as one process. Vocabulary
matrices draw only their real rows (`init_rows`): padding rows, whose number depends on the
tensor-parallel size, start at zero and change no draw.

Sharded parameters carry `model_parallel = True` (DeepSpeed counts them once per rank in the
gradient norm); replicated ones carry it only on tensor rank 0, so they are counted once per
model replica as well (see `mark_for_grad_norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.init import normal_
from megatron.parallel.comm import enter_tp, gather_last_dim, leave_tp, reduce_from_tp, sequence_shared
from megatron.parallel.groups import SINGLE, TensorParallel


def _sharded(full_shape: tuple[int, ...], dim: int, tp: TensorParallel, std: float | None,
             gen: torch.Generator | None, device: torch.device | str, init_rows: int | None = None) -> nn.Parameter:
    """This rank's slice of a weight drawn whole. With `init_rows`, only the first `init_rows`
    entries along `dim` (a vocabulary's real rows) are drawn and the padding starts at zero, so
    the real rows, and whatever the generator draws next, do not depend on the padding."""
    shape = list(full_shape)
    shape[dim] //= tp.size
    param = nn.Parameter(torch.empty(shape, device=device))
    if std is not None and param.device.type != "meta":
        if init_rows is None:
            full = torch.empty(full_shape)
            normal_(full, std, gen)
        else:
            full = torch.zeros(full_shape)
            normal_(full.narrow(dim, 0, init_rows), std, gen)
        param.data.copy_(full.chunk(tp.size, dim=dim)[tp.rank])
    param.tp_sharded = True
    return param


def _replicated(n: int, device: torch.device | str, value: float) -> nn.Parameter:
    param = nn.Parameter(torch.empty(n, device=device))
    if param.device.type != "meta":
        nn.init.constant_(param, value)
    param.tp_sharded = False
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (outputs) split over ranks; output stays split.

    `init_rows`: draw only the first rows of W (the rest start at zero), see `_sharded`."""

    def __init__(self, n_in: int, n_out: int, std: float, gen: torch.Generator, device: torch.device | str = "cpu",
                 bias: bool = True, tp: TensorParallel = SINGLE, gather_output: bool = False,
                 init_rows: int | None = None) -> None:
        super().__init__()
        self.tp, self.gather_output = tp, gather_output
        self.weight = _sharded((n_out, n_in), 0, tp, std, gen, device, init_rows)
        self.bias = None
        if bias:
            self.bias = _sharded((n_out,), 0, tp, None, None, device)
            if self.bias.device.type != "meta":
                nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(enter_tp(x, self.tp), self.weight, self.bias)
        return gather_last_dim(y, self.tp) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (inputs) split over ranks; the input is already split.

    The bias is replicated and added once after the reduction, so any layout computes what one
    process does. `partial` and `add_bias` let a layer sum two row-parallel outputs before a
    single reduction (the parallel residual)."""

    def __init__(self, n_in: int, n_out: int, std: float, gen: torch.Generator, device: torch.device | str = "cpu",
                 bias: bool = True, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _sharded((n_out, n_in), 1, tp, std, gen, device)
        self.bias = _replicated(n_out, device, 0.0) if bias else None

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + sequence_shared(self.bias, self.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(leave_tp(self.partial(x), self.tp))


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split over ranks; each rank looks up its own rows
    and the partial results are summed (tokens outside a rank's range contribute zeros).

    `init_rows`: draw only the first rows (the real vocabulary; padding starts at zero)."""

    def __init__(self, vocab: int, dim: int, std: float, gen: torch.Generator, device: torch.device | str = "cpu",
                 tp: TensorParallel = SINGLE, init_rows: int | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _sharded((vocab, dim), 0, tp, std, gen, device, init_rows)
        self.start = tp.rank * (vocab // tp.size)
        self.end = self.start + vocab // tp.size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.start) | (tokens >= self.end)
        local = (tokens - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        # Always the full sequence: the caller adds positions, then may scatter to sequence shards.
        return reduce_from_tp(out, self.tp)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose replicated parameters get summed gradients under sequence parallelism."""

    def __init__(self, dim: int, eps: float, device: torch.device | str, tp: TensorParallel = SINGLE) -> None:
        super().__init__(dim, eps=eps, device=device)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, sequence_shared(self.weight, self.tp),
                            sequence_shared(self.bias, self.tp), self.eps)


class RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, eps: float, device: torch.device | str, tp: TensorParallel = SINGLE) -> None:
        super().__init__(dim, eps=eps, device=device)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, sequence_shared(self.weight, self.tp), self.eps)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over vocabulary-split logits; no rank ever holds the full logits.

    Logits may be -inf (padded vocabulary columns, see `megatron.model.gpt.mask_padded_vocab`):
    they get probability 0 and gradient 0. A rank whose columns are all -inf has a local max of
    -inf, but the all-reduced max is finite as long as one column anywhere is real, so nothing
    computes -inf - (-inf)."""

    @staticmethod
    def forward(ctx, logits, labels, tp, start):
        logits = logits.float()
        local_max = logits.max(dim=-1).values
        torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=tp.group)
        shifted = logits - local_max.unsqueeze(-1)
        v = logits.shape[-1]
        outside = (labels < start) | (labels >= start + v)
        local = (labels - start).masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        stats = torch.stack([target, sum_exp])
        torch.distributed.all_reduce(stats, group=tp.group)
        target, sum_exp = stats[0], stats[1]
        loss = sum_exp.log() - target
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        g = softmax.clone()
        hit = (~outside).float()
        g.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Per-token loss [b, s] from logits split over the vocabulary on tensor-parallel ranks."""
    if tp.size == 1:
        return F.cross_entropy(logits.float().flatten(0, -2), labels.reshape(-1), reduction="none").view(labels.shape)
    return _VocabParallelCE.apply(logits, labels, tp, tp.rank * logits.shape[-1])


def mark_for_grad_norm(module: nn.Module, tp: TensorParallel) -> None:
    """Set DeepSpeed's `model_parallel` flag: sharded parameters always, replicated ones on tensor
    rank 0 only, so a global gradient norm counts every parameter exactly once."""
    for p in module.parameters():
        p.model_parallel = bool(getattr(p, "tp_sharded", False)) or tp.rank == 0
