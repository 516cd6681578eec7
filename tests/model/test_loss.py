"""The loss the engines call: eager, or compiled with a fallback that keeps the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.model import loss as loss_module
from megatron.model.loss import CompiledLoss, lm_loss, loss_function
from megatron.parallel.groups import TensorParallel


def logits_and_labels(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 16, 97, generator=gen) * 3).to(dtype).requires_grad_()
    return logits, torch.randint(0, 97, (2, 16), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_is_fp32_cross_entropy(dtype):
    logits, labels = logits_and_labels(dtype)
    loss = lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.detach().double().view(-1, 97), labels.view(-1))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    def compile_that_fails(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(loss_module.torch, "compile", compile_that_fails)
    fn = loss_function(compile=True)
    logits, labels = logits_and_labels(torch.float32)
    loss = fn(logits, labels)
    loss.backward()
    err = capsys.readouterr().err
    assert err.count("compile_loss: torch.compile failed (RuntimeError: InvalidCxxCompiler") == 1
    assert err.rstrip().endswith("using the eager loss")
    reference = logits.detach().requires_grad_()
    lm_loss(reference, labels).backward()
    assert float(loss.detach()) == float(lm_loss(reference, labels).detach())
    assert torch.equal(logits.grad, reference.grad)
    fn(logits, labels)  # later calls stay eager without another message
    assert capsys.readouterr().err == ""


def test_trial_runs_once_per_grad_mode(monkeypatch):
    calls = []

    def counting_compile(fn, **kwargs):
        def run(*args):
            calls.append(torch.is_grad_enabled() and args[0].requires_grad)
            return fn(*args)
        return run

    monkeypatch.setattr(loss_module.torch, "compile", counting_compile)
    fn = CompiledLoss()
    logits, labels = logits_and_labels(torch.float32)
    fn(logits, labels).backward()
    fn(logits, labels).backward()
    with torch.no_grad():
        fn(logits, labels)
    # trial + call for training, another call, trial + call for eval
    assert calls == [True, True, True, False, False]


def test_compiled_loss_needs_tensor_parallel_size_one():
    with pytest.raises(ValueError, match="model_parallel_size 1 only"):
        loss_function(TensorParallel(size=2), compile=True)
