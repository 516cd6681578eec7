"""Padded vocabulary rows never change what the model computes.

The embedding and output layer have padded_vocab rows (vocab_size rounded up for tensor
parallelism). Given the real vocab_size, the padding logits are -inf and the padding rows start
at zero, so a model (and a training run) is the same whatever the padding, hence whatever the
tensor-parallel size: logits, losses and gradients agree to 1e-5 relative, padded rows get
exactly zero gradient, and nothing is NaN when a whole rank holds only padding.
"""

from __future__ import annotations

import math

import pytest
import torch

import padding_workers
from helpers import metrics, run_cli, run_distributed
from megatron.config.schema import ModelConfig
from megatron.model import GPTModel, layer_defs, lm_loss
from megatron.tokenizer import build_tokenizer, pad_vocab_size

TOL = dict(rtol=1e-5, atol=1e-6)


def model_cfg(**kw) -> ModelConfig:
    base = dict(pos_emb="rotary", num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, rotary_pct=0.5)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("tied", [False, True])
def test_padded_logits_are_minus_inf_and_change_nothing(tied):
    m = model_cfg(no_weight_tying=not tied)
    masked = GPTModel(layer_defs(m, 128, 128, 16, seed=5, vocab_size=100))
    unmasked = GPTModel(layer_defs(m, 128, 128, 16, seed=5))  # vocab_size=None: all 128 rows real
    unpadded = GPTModel(layer_defs(m, 100, 128, 16, seed=5))
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, dims=1)
    logits = masked(tokens)
    assert logits.shape == (2, 16, 128)
    assert torch.equal(logits[..., 100:], torch.full((2, 16, 28), float("-inf")))
    assert torch.isfinite(logits[..., :100]).all()
    with torch.no_grad():
        torch.testing.assert_close(logits[..., :100], unmasked(tokens)[..., :100], **TOL)
    reference = unpadded(tokens)
    torch.testing.assert_close(logits[..., :100], reference, **TOL)
    loss, ref_loss = lm_loss(logits, labels), lm_loss(reference, labels)
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss, ref_loss, **TOL)
    loss.backward()
    ref_loss.backward()
    ref_grads = dict(unpadded.named_parameters())
    for name, p in masked.named_parameters():
        g = p.grad
        if "word_embeddings" in name or "final_linear" in name:
            assert torch.equal(g[100:], torch.zeros(28, 32)), name
            g = g[:100]
        torch.testing.assert_close(g, ref_grads[name].grad, **TOL, msg=lambda s: f"{name}: {s}")


def test_no_padding_and_no_vocab_size_leave_logits_alone():
    m = model_cfg(no_weight_tying=True)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    a = GPTModel(layer_defs(m, 64, 128, 16, seed=2, vocab_size=64))(tokens)
    b = GPTModel(layer_defs(m, 64, 128, 16, seed=2))(tokens)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    with pytest.raises(ValueError, match="vocab_size"):
        layer_defs(m, 64, 128, 16, seed=2, vocab_size=65)


def test_real_rows_are_drawn_the_same_whatever_the_padding():
    """Only the real rows are drawn (padding starts at zero), so the real rows and the learned
    position embeddings drawn after them do not depend on the padded size, even where the
    sizes are not multiples of 16 (torch's normal_ redraws the last 16 values of such a tensor)."""
    m = model_cfg(hidden_size=20, pos_emb="learned", no_weight_tying=True)  # 101 x 20 = 2020, not a multiple of 16
    a, b = (GPTModel(layer_defs(m, padded, 80, 16, seed=7, vocab_size=101)) for padded in (101, 256))
    for key in ("0.word_embeddings.weight", "4.final_linear.weight"):
        wa, wb = a.layers.state_dict()[key], b.layers.state_dict()[key]
        assert torch.equal(wa[:101], wb[:101]), key
        assert not wa[101:].any() and not wb[101:].any(), key
    assert torch.equal(a.layers[0].position_embeddings.weight, b.layers[0].position_embeddings.weight)


def test_vocab_parallel_cross_entropy_with_a_rank_of_padding():
    run_distributed(padding_workers.cross_entropy_with_padding, 2)


@pytest.mark.parametrize("tied", [False, True])
def test_tensor_parallel_model_with_a_rank_of_padding(tied):
    run_distributed(padding_workers.model_with_padding, 2, tied)


def test_tp1_and_tp2_train_the_same_model_despite_different_padding(tiny, tmp_path):
    """train.py at TP1 (257 -> 384 rows) and deepy.py at TP2 (257 -> 512 rows): same 4 steps."""
    vocab = build_tokenizer("CharLevelTokenizer").vocab_size
    assert vocab == 257
    assert pad_vocab_size(vocab, 128, 1) == 384 and pad_vocab_size(vocab, 128, 2) == 512
    common = dict(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4, train_iters=4,
                  eval_interval=100, zero_optimization={"stage": 1}, checkpoint_factor=None, save=None,
                  make_vocab_size_divisible_by=128)
    proc = run_cli("train.py", tiny("tp1", **common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("deepy.py", "train.py", tiny("tp2", **common, model_parallel_size=2, num_gpus=2,
                                                 master_port=29017))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one, two = metrics(tmp_path / "tp1" / "logs"), metrics(tmp_path / "tp2" / "logs")
    assert len(one) == 4 and len(two) == 4
    for a, b in zip(one, two):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
