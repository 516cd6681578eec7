"""Model FLOPs per token and device peaks (the MFU numerator and denominator)."""

from fractions import Fraction
import time
from types import SimpleNamespace

import pytest
import torch

from megatron.training import flops
from megatron.training.flops import (
    device_peak_flops,
    flops_per_token,
    gpu_table_peak,
    measure_matmul_peak,
    utilisation,
)

# GPT-NeoX-20B (its paper and model card).
L, H, S, V = 44, 6144, 2048, 50432


def test_tiny_model_by_hand():
    # L=1, h=2, s=4, V=8, f=4h=8. Forward: QKV 2*2*6=24, dense 2*2*2=8, MLP 2*2*8*2=64,
    # QK^T 2*4*2=16, scores x V 16, output 2*2*8=32 -> 160; training 3 x 160 = 480.
    assert flops_per_token(1, 2, 4, 8) == 480
    # f=3: MLP 2*2*3*2=24 -> forward 24+8+24+32+32=120 -> 360.
    assert flops_per_token(1, 2, 4, 8, ffn_hidden_size=3) == 360
    # Two layers double the layer part only: 2*(24+8+64+32)+32 = 288 -> 864.
    assert flops_per_token(2, 2, 4, 8) == 864


def test_20b_matches_closed_form():
    # Closed form without recomputation (3 passes), per token:
    # 72*L*h^2*(1 + s/(6h) + V/(12*h*L)), evaluated exactly.
    closed = 72 * L * H**2 * (1 + Fraction(S, 6 * H) + Fraction(V, 12 * H * L))
    assert closed.denominator == 1
    assert flops_per_token(L, H, S, V) == closed == 128_090_898_432


def test_20b_matches_megatron_formula_minus_recompute():
    # Megatron-LM (Narayanan et al. 2021) per iteration, WITH full recomputation:
    # 96*B*s*L*h^2*(1 + s/(6h) + V/(16*L*h)) = 4 passes of the layers + 3 of the logits.
    # Per token (B*s tokens), minus the one recomputed forward of the layers, L*(24h^2 + 4sh),
    # must give the model FLOPs.
    batch = 1536
    megatron_iter = 96 * batch * S * L * H**2 * (1 + Fraction(S, 6 * H) + Fraction(V, 16 * L * H))
    recomputed_forward = L * (24 * H**2 + 4 * S * H)
    assert megatron_iter / (batch * S) - recomputed_forward == flops_per_token(L, H, S, V)


def test_explicit_default_ffn_and_validation():
    assert flops_per_token(L, H, S, V, ffn_hidden_size=4 * H) == 128_090_898_432
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        flops_per_token(2, 0, 16, 32)
    with pytest.raises(ValueError, match="ffn_hidden_size must be positive, got -1"):
        flops_per_token(2, 8, 16, 32, ffn_hidden_size=-1)


@pytest.mark.parametrize(
    "name, dtype, tf32, expected",
    [
        ("NVIDIA A100-SXM4-40GB", torch.bfloat16, False, 312e12),
        ("NVIDIA A100 80GB PCIe", torch.float16, False, 312e12),
        ("NVIDIA A100-SXM4-40GB", torch.float32, False, 19.5e12),
        ("NVIDIA A100-SXM4-40GB", torch.float32, True, 156e12),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, 756e12),
        ("NVIDIA H100 NVL", torch.bfloat16, False, 835.5e12),
        ("NVIDIA H200", torch.bfloat16, False, 989e12),
        ("NVIDIA GH200 480GB", torch.bfloat16, False, 989e12),
        ("NVIDIA A10", torch.float16, False, 125e12),
        ("NVIDIA L4", torch.bfloat16, False, 121e12),
        ("NVIDIA L40S", torch.bfloat16, False, 362e12),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, 165.2e12),
        ("Tesla V100-SXM2-16GB", torch.float16, False, 125e12),
        ("Tesla V100-PCIE-32GB", torch.float16, False, 112e12),
        # Listed parts without a fast path for the dtype, and unlisted parts: None, so
        # the caller measures. "A10G" must not match "A10", nor "A100" match "A10".
        ("Tesla V100-SXM2-16GB", torch.bfloat16, False, None),
        ("Tesla T4", torch.float32, True, None),
        ("NVIDIA A10G", torch.bfloat16, False, None),
        ("NVIDIA A100-SXM4-40GB", torch.float64, False, None),
        ("Some Future GPU", torch.bfloat16, False, None),
    ],
)
def test_gpu_table(name, dtype, tf32, expected):
    assert gpu_table_peak(name, dtype, tf32=tf32) == expected


def test_device_peak_flops_cuda_uses_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(flops, "_tf32_matmuls_enabled", lambda: False)
    assert device_peak_flops(torch.device("cuda"), torch.bfloat16) == 312e12
    assert device_peak_flops(torch.device("cuda", 0), torch.float32) == 19.5e12
    monkeypatch.setattr(flops, "_tf32_matmuls_enabled", lambda: True)
    assert device_peak_flops(torch.device("cuda", 0), torch.float32) == 156e12


def test_device_peak_flops_cpu_measures_once(monkeypatch):
    calls = []

    def fake_measure(dtype, device="cpu", n=1024, seconds=1.0):
        calls.append((dtype, str(device), n))
        return 5.0e10

    monkeypatch.setattr(flops, "_MEASURED", {})
    monkeypatch.setattr(flops, "measure_matmul_peak", fake_measure)
    assert device_peak_flops(torch.device("cpu"), torch.float32) == 5.0e10
    assert device_peak_flops(torch.device("cpu"), torch.float32) == 5.0e10
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) == 5.0e10
    assert calls == [(torch.float32, "cpu", 1024), (torch.bfloat16, "cpu", 1024)]


def test_measure_matmul_peak_on_this_cpu():
    start = time.perf_counter()
    peak = measure_matmul_peak(torch.float32, "cpu", n=256, seconds=0.2)
    elapsed = time.perf_counter() - start
    assert peak > 1e8
    # Timing stops at the first chunk that ends past `seconds`; chunks double, so it runs
    # at most about 2 x 0.2 s plus warm-up. The bound leaves room for a loaded machine.
    assert 0.2 <= elapsed < 5.0


def test_measure_matmul_peak_takes_the_best_burst(monkeypatch):
    # A fake clock: each burst's duration is scripted, so the rates are exact. n=2: 16 FLOPs
    # per matmul. Target burst = 0.75 s / 3 = 0.25 s.
    durations = iter([9.0, 0.2, 1.0, 0.25, 0.5])  # warm-up, 1 short burst, 3 timed bursts
    clock = {"now": 0.0, "started": False}

    def perf_counter() -> float:
        if clock["started"]:
            clock["now"] += next(durations)
        clock["started"] = not clock["started"]
        return clock["now"]

    matmuls = []
    real_mm = torch.mm
    monkeypatch.setattr(flops, "time", SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(torch, "mm", lambda a, b, out: matmuls.append(1) or real_mm(a, b, out=out))
    peak = measure_matmul_peak(torch.float32, "cpu", n=2, seconds=0.75, repeats=3)
    # Warm-up 2 matmuls; 1 matmul in 0.2 s (80 FLOP/s) is under the target, so bursts double to
    # 2 matmuls: 32 FLOPs in 1.0 s (a busy device), 0.25 s (128 FLOP/s) and 0.5 s. The best wins.
    assert peak == 128.0
    assert len(matmuls) == 2 + 1 + 3 * 2
    with pytest.raises(ValueError, match=r"^need repeats >= 1 and seconds > 0, got 0 and 1.0$"):
        measure_matmul_peak(torch.float32, repeats=0)


def test_utilisation_never_exceeds_one():
    assert utilisation(5e10, 1e11) == (0.5, 1e11)
    assert utilisation(1e11, 1e11) == (1.0, 1e11)
    # Faster than the "peak": the estimate was low, the observed rate becomes the peak.
    assert utilisation(2.5e11, 1e11) == (1.0, 2.5e11)


def test_log_raises_the_peak_once_exceeded(monkeypatch):
    from megatron.training import loop

    printed, logged = [], []
    run = SimpleNamespace(
        cfg=SimpleNamespace(derived=SimpleNamespace(train_batch_size=4, world_size=1),
                            model=SimpleNamespace(seq_length=8)),
        flops_per_token=10**9,
        peak_flops=1e10,
        scheduler=SimpleNamespace(get_lr=lambda: 0.1),
        stepper=SimpleNamespace(grad_norm=lambda: 1.0, loss_scale=lambda: None, skipped_steps=0),
        logger=SimpleNamespace(log_train=lambda it, m: logged.append(m)),
        print=printed.append,
    )
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: 100.0))

    def log(seconds: float) -> dict:
        stats = loop.IntervalStats(losses=[2.0, 2.0], start=100.0 - seconds)
        loop._log(run, 2, stats)
        return logged[-1]

    # 4 x 8 tokens x 2 iterations in 2 s = 32 tokens/s x 1e9 FLOPs = 3.2e10 FLOP/s, above 1e10.
    assert log(2.0)["mfu"] == 1.0
    assert run.peak_flops == pytest.approx(3.2e10, rel=1e-12)
    assert printed == ["MFU: 0.032 TFLOPS achieved is above the 0.01 TFLOPS peak estimated so far; the peak is "
                       "re-estimated as this rate (megatron/training/flops.py)"]
    # Half the rate: half the (re-estimated) peak; nothing more printed.
    assert log(4.0)["mfu"] == pytest.approx(0.5, rel=1e-12)
    assert len(printed) == 1
