"""Tensor-parallel building blocks. With one rank each is exactly its dense twin.

These are Megatron-style layers: the model builds them with its tensor-parallel group, so
tensor parallelism lives inside the model (megatron/model), not wrapped around it.

Initialisation draws the FULL weight from the layer's generator on every rank and keeps this
rank's slice, so any tensor-parallel layout starts from the same model as one process. Vocabulary
matrices draw only their real rows (`init_rows`): padding rows, whose number depends on the
tensor-parallel size, start at zero and change no draw.

A fused column-parallel weight made of several blocks (GPT-NeoX's grouped-query
`query_key_value` = [queries; keys; values], a gated MLP's `dense_h_to_4h` = [values; gates]) is
split block by block: each rank holds its slice of every block, in block order (`shard`). The
whole (one-process) tensor is the blocks one after another; `unshard` is the inverse.

Sharded parameters carry `model_parallel = True` (DeepSpeed counts them once per rank in the
gradient norm); replicated ones carry it only on tensor rank 0, so they are counted once per
model replica as well (see `mark_for_grad_norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.parallel.comm import enter_tp, gather_last_dim, leave_tp, reduce_from_tp, sequence_shared
from megatron.parallel.groups import SINGLE, TensorParallel


@torch.no_grad()
def normal_(tensor: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Fill in place; drawn on the CPU in fp32 so results match across devices and dtypes."""
    if tensor.device.type == "meta":
        return
    values = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    tensor.copy_(values)


Blocks = tuple[int, ...] | None  # sizes, along the split dim, of a fused tensor's blocks; None: one block


def shard(full: torch.Tensor, dim: int, size: int, blocks: Blocks = None) -> list[torch.Tensor]:
    """The `size` tensor-parallel shards of a whole tensor along `dim`: each block is cut into
    `size` equal slices and rank r holds its slice of every block, concatenated."""
    parts = full.split(list(blocks), dim=dim) if blocks else [full]
    if any(p.shape[dim] % size for p in parts):
        by_block = f" block by block {list(blocks)}" if blocks else ""
        raise ValueError(f"dimension {dim} of shape {list(full.shape)} does not split into {size} ranks{by_block}")
    sliced = [p.chunk(size, dim=dim) for p in parts]
    return [torch.cat([s[rank] for s in sliced], dim=dim).contiguous() for rank in range(size)]


def unshard(shards: list[torch.Tensor], dim: int, blocks: Blocks = None) -> torch.Tensor:
    """The whole tensor from its shards (rank order); the inverse of `shard`."""
    if not blocks:
        return torch.cat(shards, dim=dim)
    per_rank = [b // len(shards) for b in blocks]
    pieces = [s.split(per_rank, dim=dim) for s in shards]
    return torch.cat([pieces[r][i] for i in range(len(blocks)) for r in range(len(shards))], dim=dim)


def _sharded(full_shape: tuple[int, ...], dim: int, tp: TensorParallel, std: float | None,
             gen: torch.Generator | None, device: torch.device | str, init_rows: int | None = None,
             blocks: Blocks = None) -> nn.Parameter:
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
        param.data.copy_(shard(full, dim, tp.size, blocks)[tp.rank])
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

    `init_rows`: draw only the first rows of W (the rest start at zero), see `_sharded`.
    `blocks`: the output is fused from blocks of these sizes, each split over ranks (see `shard`)."""

    def __init__(self, n_in: int, n_out: int, std: float, gen: torch.Generator, device: torch.device | str = "cpu",
                 bias: bool = True, tp: TensorParallel = SINGLE, gather_output: bool = False,
                 init_rows: int | None = None, blocks: Blocks = None) -> None:
        super().__init__()
        self.tp, self.gather_output = tp, gather_output
        self.weight = _sharded((n_out, n_in), 0, tp, std, gen, device, init_rows, blocks)
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
    """nn.LayerNorm (`weight`, and `bias` unless bias=False) whose replicated parameters get
    summed gradients under sequence parallelism."""

    def __init__(self, dim: int, eps: float, device: torch.device | str, tp: TensorParallel = SINGLE,
                 bias: bool = True) -> None:
        super().__init__(dim, eps=eps, device=device, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else sequence_shared(self.bias, self.tp)
        return F.layer_norm(x, self.normalized_shape, sequence_shared(self.weight, self.tp), bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """scale * x / sqrt(mean(x^2) + eps) (+ offset when bias=True), with GPT-NeoX's parameter
    names `scale` and `offset`, so a layer's state dict reads as GPT-NeoX's files.

    It stays an nn.RMSNorm (without torch's own affine `weight`) because the optimizer leaves
    norms out of weight decay by their class."""

    def __init__(self, dim: int, eps: float, device: torch.device | str, tp: TensorParallel = SINGLE,
                 bias: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=False, device=device)
        self.tp = tp
        self.scale = _replicated(dim, device, 1.0)
        self.offset = _replicated(dim, device, 0.0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x, self.normalized_shape, sequence_shared(self.scale, self.tp), self.eps)
        return y if self.offset is None else y + sequence_shared(self.offset, self.tp)


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
