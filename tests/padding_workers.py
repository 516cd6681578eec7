"""Bodies of the padded-vocabulary tests that run on every rank of a gloo group (see
tests/model/test_vocab_padding.py). Vocabulary 100 padded to 256 at TP2: rank 0 holds ids 0-127
(100-127 padding), rank 1 holds ids 128-255 (all padding)."""

from __future__ import annotations

import torch

from megatron.config.schema import ModelConfig
from megatron.model.gpt import GPTModel, layer_defs
from megatron.model.loss import lm_loss
from megatron.parallel.groups import SINGLE, ParallelGroups
from megatron.parallel.layers import vocab_parallel_cross_entropy
from tp_workers import TOL, _gather

VOCAB, PADDED = 100, 256


def cross_entropy_with_padding(rank: int, world: int) -> None:
    """The vocab-parallel loss over -inf padded columns equals F.cross_entropy over the real ones;
    padded columns get gradient 0 and nothing is NaN (rank 1's local max is -inf)."""
    tp = ParallelGroups(1, world, 1).tensor
    gen = torch.Generator().manual_seed(3)
    real = torch.randn(3, 7, VOCAB, generator=gen, requires_grad=True)
    labels = torch.randint(0, VOCAB, (3, 7), generator=gen)
    padded = torch.full((3, 7, PADDED), float("-inf"))
    padded[..., :VOCAB] = real.detach()
    local = padded.chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, tp)
    ref = vocab_parallel_cross_entropy(real, labels, SINGLE)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, ref, **TOL)
    loss.sum().backward()
    ref.sum().backward()
    grad = _gather(local.grad, -1, tp)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[..., :VOCAB], real.grad, **TOL)
    assert torch.equal(grad[..., VOCAB:], torch.zeros_like(grad[..., VOCAB:]))


def model_with_padding(rank: int, world: int, tied: bool) -> None:
    """A TP model with vocab 100 padded to 256 computes what one process computes with no padding
    at all: logits, loss and every gradient; padded rows get exactly zero gradient."""
    tp = ParallelGroups(1, world, 1).tensor
    m = ModelConfig(pos_emb="rotary",
                    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, rotary_pct=0.5,
                    no_weight_tying=not tied)
    par = GPTModel(layer_defs(m, PADDED, 128, 16, seed=5, tp=tp, vocab_size=VOCAB))
    ref = GPTModel(layer_defs(m, VOCAB, 128, 16, seed=5))  # no padding
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    labels = tokens.roll(-1, dims=1)
    local, dense = par(tokens), ref(tokens)
    logits = _gather(local.detach(), -1, tp)
    assert torch.equal(logits[..., VOCAB:], torch.full_like(logits[..., VOCAB:], float("-inf")))
    torch.testing.assert_close(logits[..., :VOCAB], dense.detach(), **TOL)
    loss, ref_loss = lm_loss(local, labels, tp), lm_loss(dense, labels, SINGLE)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    loss.backward()
    ref_loss.backward()
    dense_grads = dict(ref.named_parameters())
    for name, p in par.named_parameters():
        g = p.grad
        if getattr(p, "tp_sharded", False):
            dim = 1 if name.endswith("dense.weight") or name.endswith("dense_4h_to_h.weight") else 0
            g = _gather(g, dim, tp)
        assert torch.isfinite(g).all(), name
        if "word_embeddings" in name or "final_linear" in name:
            assert torch.equal(g[VOCAB:], torch.zeros_like(g[VOCAB:])), name
            g = g[:VOCAB]
        torch.testing.assert_close(g, dense_grads[name].grad, **TOL, msg=lambda s: f"{name}: {s}")
