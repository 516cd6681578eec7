"""Speed-ups of our training step that were tried and NOT adopted, kept to reproduce the record.

The ones that paid are in megatron/ now (fused AdamW in training/optimizer.py, the compiled loss
in model/loss.py, the allocator setting in parallel/device.py). Each candidate here takes
(model, cfg, optimizer, loss_fn) and returns the same triple, changed: its own loss function,
compiled submodules, or (rotary) a rotary function that is active only while that instance's
forward runs. So `bench_train_vs_hf.py --candidates a,b` times `ours`, `ours+a` and `ours+b`
side by side in one process. README.md gives the measured effect of each.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model import transformer as transformer_module
from megatron.model.rotary import RotaryEmbedding, apply_rotary

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --- loss ------------------------------------------------------------------------------------

def loss_bf16(model, cfg, opt, loss_fn):
    """Cross-entropy in the logits' dtype: no fp32 copy of the [b*s, V] logits."""
    def loss(m, tokens, labels):
        logits = m(tokens)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
    return model, loss, opt


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy computed in fp32 a block of rows at a time.

    Same numbers as `lm_loss` (fp32 log-softmax, gradient rounded to the logits' dtype), but the
    fp32 [rows, V] intermediates exist one block at a time, small enough to stay in cache,
    instead of four full [b*s, V] fp32 tensors (upcast copy, log-softmax, its zero-filled
    gradient, the gradient of the upcast) written to and read from memory.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for i in range(0, n, rows):
            lse[i:i + rows] = torch.logsumexp(logits[i:i + rows].float(), dim=-1)
        target = logits.gather(1, labels[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, labels, lse)
        ctx.rows = rows
        return (lse - target).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        n, rows = logits.shape[0], ctx.rows
        grad = torch.empty_like(logits)
        scale = grad_out.float() / n
        for i in range(0, n, rows):
            p = logits[i:i + rows].float().sub_(lse[i:i + rows, None]).exp_()  # softmax
            p[torch.arange(p.shape[0], device=p.device), labels[i:i + rows]] -= 1.0
            grad[i:i + rows] = p.mul_(scale)
        return grad, None, None


def chunked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, rows: int = 128) -> torch.Tensor:
    return ChunkedCrossEntropy.apply(logits.view(-1, logits.shape[-1]), labels.reshape(-1), rows)


def split_lm_loss(logits: torch.Tensor, labels: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """lm_loss over blocks of rows with torch's own kernels: each block is upcast, log-softmaxed
    and differentiated while it is in cache; split's backward writes the bf16 gradient once."""
    flat, flat_labels = logits.view(-1, logits.shape[-1]), labels.reshape(-1)
    total = sum(F.cross_entropy(x.float(), y, reduction="sum")
                for x, y in zip(flat.split(rows), flat_labels.split(rows)))
    return total / flat.shape[0]


def loss_split(model, cfg, opt, loss_fn):
    """lm_loss as split_lm_loss (fp32 math, blocks of 256 rows, autograd per block)."""
    return model, (lambda m, tokens, labels: split_lm_loss(m(tokens), labels)), opt


def loss_chunked(model, cfg, opt, loss_fn):
    """lm_loss as ChunkedCrossEntropy (fp32 math, blocks of 128 rows)."""
    return model, (lambda m, tokens, labels: chunked_lm_loss(m(tokens), labels)), opt


# --- attention / rotary ----------------------------------------------------------------------
# Attention.forward calls the module-level `apply_rotary` of megatron.model.transformer. To swap
# it for ONE model instance, that name is replaced (once) by a dispatcher that uses the rotary
# function of the candidate whose forward is running, and the original otherwise. The forward
# itself is not copied, so the candidates follow whatever Attention.forward currently does.

_ACTIVE_ROTARY: list[Callable] = []


def _install_rotary_dispatch() -> None:
    if getattr(transformer_module.apply_rotary, "_bench_dispatch", False):
        return
    original = transformer_module.apply_rotary

    def dispatch(x, cos, sin):
        return (_ACTIVE_ROTARY[-1] if _ACTIVE_ROTARY else original)(x, cos, sin)
    dispatch._bench_dispatch = True
    transformer_module.apply_rotary = dispatch


def _with_rotary(fn: Callable, loss_fn: LossFn) -> LossFn:
    _install_rotary_dispatch()

    def loss(m, tokens, labels):
        _ACTIVE_ROTARY.append(fn)
        try:
            return loss_fn(m, tokens, labels)
        finally:
            _ACTIVE_ROTARY.pop()
    return loss


def _cache_cos_sin(model: nn.Module) -> None:
    """Each RotaryEmbedding of `model` computes its tables once per (seq, dtype)."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            original, cache = module.cos_sin, {}

            def cos_sin(seq_len, dtype, original=original, cache=cache):
                if (seq_len, dtype) not in cache:
                    cache[(seq_len, dtype)] = original(seq_len, dtype)
                return cache[(seq_len, dtype)]
            module.cos_sin = cos_sin  # instance attribute: this model only


def rotary_cache(model, cfg, opt, loss_fn):
    """cos/sin tables computed once per (seq, dtype) instead of in every layer of every step."""
    _cache_cos_sin(model)
    return model, loss_fn, opt


def rotate_onecat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary with one cat: [x1 c - x2 s, x2 c + x1 s, x_pass], c and s the half tables
    (the rotate-half tables repeat their first half)."""
    rot = cos.shape[-1]
    half = rot // 2
    x1, x2, x_pass = x[..., :half], x[..., half:rot], x[..., rot:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x_pass), dim=-1)


def rotary_onecat(model, cfg, opt, loss_fn):
    """Rotary without rotate_half's concatenation (one cat per tensor instead of two), plus
    cached tables."""
    _cache_cos_sin(model)
    return model, _with_rotary(rotate_onecat, loss_fn), opt


_compiled_rotary: list[Callable] = []


def rotary_compile(model, cfg, opt, loss_fn):
    """torch.compile (inductor, C++ on the CPU) of apply_rotary: one fused kernel each way."""
    if not _compiled_rotary:
        _compiled_rotary.append(torch.compile(apply_rotary, dynamic=False))
    _cache_cos_sin(model)
    return model, _with_rotary(_compiled_rotary[0], loss_fn), opt


def sdpa_math(model, cfg, opt, loss_fn):
    """Force SDPA's math backend (instead of the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def loss(m, tokens, labels):
        with sdpa_kernel(SDPBackend.MATH):
            return loss_fn(m, tokens, labels)
    return model, loss, opt


def _causal_probs_and_dscores(scores, lse, dprobs, delta, scale: float, dtype: torch.dtype):
    """Softmax probabilities rebuilt from the forward's logsumexp, and the scores' gradient
    (p * (dp - rowsum(dO * O)) * scale), both masked causally: one pass to fuse."""
    row = torch.arange(scores.shape[-2], device=scores.device).unsqueeze(-1)
    col = torch.arange(scores.shape[-1], device=scores.device)
    p = torch.where(col <= row, torch.exp(scores.float() * scale - lse.unsqueeze(-1)), 0.0)
    ds = p * (dprobs.float() - delta.unsqueeze(-1)) * scale
    return p.to(dtype), ds.to(dtype)


_compiled_probs: list[Callable] = []


def attention_backward_from_lse(q, k, v, out, lse, dout, scale: float, fp32_scores: bool):
    """Causal attention backward as five batched matmuls and one compiled elementwise pass,
    from the logsumexp that the CPU flash forward returns (instead of its backward kernel).

    fp32_scores=False: q k^T and dO v^T come out of bf16 matmuls rounded to bf16, which the
    flash kernel (fp32 accumulators) does not do; True: those two matmuls in fp32."""
    if not _compiled_probs:
        _compiled_probs.append(torch.compile(_causal_probs_and_dscores, dynamic=False))
    if fp32_scores:
        scores = q.float() @ k.float().transpose(-1, -2)
        dprobs = dout.float() @ v.float().transpose(-1, -2)
    else:
        scores, dprobs = q @ k.transpose(-1, -2), dout @ v.transpose(-1, -2)
    delta = (dout.float() * out.float()).sum(-1)
    p, ds = _compiled_probs[0](scores, lse, dprobs, delta, scale, q.dtype)
    return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dout


# --- compilation -----------------------------------------------------------------------------

def compile_layers(model, cfg, opt, loss_fn):
    """torch.compile each layer of the list in place (nn.Module.compile; same parameters).
    Fails in torch 2.13 with the parallel residual: see compile_blocks."""
    for layer in model.layers:
        layer.compile(dynamic=False)
    return model, loss_fn, opt


def compile_blocks(model, cfg, opt, loss_fn):
    """torch.compile of each Attention and MLP (and norm) module, the residual adds left eager.

    Compiling whole TransformerLayers hits an inductor C++ codegen bug in torch 2.13 with the
    parallel residual: the gradients of attention.dense.bias and mlp.dense_4h_to_h.bias are the
    same row sum, and the generated kernel declares its bf16 result twice (CppCompileError
    "conflicting declaration 'auto at_BFloat16_tmp_acc0_vec'")."""
    from megatron.model.transformer import MLP, Attention

    for module in model.modules():
        if isinstance(module, (Attention, MLP, nn.LayerNorm)):
            module.compile(dynamic=False)
    return model, loss_fn, opt


def compile_model(model, cfg, opt, loss_fn):
    """torch.compile of the whole forward and the loss (one graph, logits -> loss fused).
    Fails in torch 2.13 with the parallel residual: see compile_blocks."""
    from megatron.model.loss import lm_loss

    def forward_loss(tokens, labels):
        return lm_loss(model(tokens), labels)
    compiled = torch.compile(forward_loss, dynamic=False)
    return model, (lambda m, tokens, labels: compiled(tokens, labels)), opt


CANDIDATES = {
    "loss_bf16": loss_bf16,
    "loss_chunked": loss_chunked,
    "loss_split": loss_split,
    "rotary_cache": rotary_cache,
    "rotary_onecat": rotary_onecat,
    "rotary_compile": rotary_compile,
    "sdpa_math": sdpa_math,
    "compile_layers": compile_layers,
    "compile_model": compile_model,
    "compile_blocks": compile_blocks,
}
