"""LR schedule values and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.config.blocks import OptimizerParams
from megatron.config.schema import ModelConfig, OptimizerConfig, OptimizerSpec
from megatron.model import GPTModel, layer_defs
from megatron.training.lr_schedule import AnnealingLR
from megatron.training.optimizer import build_optimizer, clip_in_optimizer, param_groups


def schedule(style: str) -> AnnealingLR:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return AnnealingLR(opt, max_lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style=style)


@pytest.mark.parametrize("style, at_60", [("cosine", 0.1 + 0.9 * 0.5), ("linear", 0.1 + 0.9 * 0.5), ("constant", 1.0)])
def test_warmup_then_decay(style, at_60):
    s = schedule(style)
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(0.5) and s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(at_60)
    assert s.lr_at(110) == pytest.approx(1.0 if style == "constant" else 0.1)
    assert s.lr_at(500) == pytest.approx(1.0 if style == "constant" else 0.1)
    if style == "cosine":
        assert s.lr_at(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))


def test_schedule_state_round_trip_sets_optimizer_lr():
    s = schedule("cosine")
    for _ in range(37):
        s.step()
    t = schedule("cosine")
    t.load_state_dict(s.state_dict())
    assert t.get_lr() == s.get_lr() == s.lr_at(37)
    assert t.optimizer.param_groups[0]["lr"] == s.lr_at(37)


def test_no_weight_decay_on_biases_and_norms():
    m = ModelConfig(pos_emb="rotary", num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=8)
    model = GPTModel(layer_defs(m, 64, 128, 8, seed=0))  # tied embedding
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        n for n in names.values() if n.endswith("bias") or "norm" in n)
    assert all(names[id(p)].endswith("weight") and "norm" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimizerConfig(optimizer=OptimizerSpec("Adam", OptimizerParams(betas=[0.9, 0.95]))), 1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    assert opt.defaults["fused"] is True  # torch's one-pass kernel, not the per-op default on the CPU


@pytest.mark.parametrize("max_norm", [0.0, 1.0, 100.0])
def test_clip_in_optimizer_reports_the_norm_before_clipping(max_norm):
    """Counted: weights, and the bias flagged as this rank's to count; not counted: a bias that
    another tensor rank counts (model_parallel False) or a tied pipeline copy."""
    w, b, other, tied = (torch.nn.Parameter(torch.zeros(n)) for n in (4, 2, 3, 1))
    other.model_parallel, tied.ds_pipe_replicated, b.model_parallel = False, True, True
    grads = {w: [3.0, 0.0, 4.0, 0.0], b: [0.0, 12.0], other: [100.0, 0.0, 0.0], tied: [50.0]}
    for p, g in grads.items():
        p.grad = torch.tensor(g)
    opt = torch.optim.SGD([w, b, other, tied], lr=1.0)
    clip_in_optimizer(opt, max_norm)
    opt.step()
    assert opt._global_grad_norm == pytest.approx(13.0)  # sqrt(3^2 + 4^2 + 12^2)
    coef = min(1.0, max_norm / (13.0 + 1e-6)) if max_norm else 1.0
    # SGD with lr 1 moves each parameter by minus its (clipped) gradient: every gradient is
    # scaled, counted or not, as DeepSpeed's clipping does.
    for p, g in grads.items():
        assert p.detach().tolist() == pytest.approx([-coef * x for x in g])
