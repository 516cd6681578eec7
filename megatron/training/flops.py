"""Model FLOPs per token and the peak FLOP/s of a device, the two halves of MFU.

MFU = achieved model FLOP/s / device peak FLOP/s, where "model FLOPs" are the FLOPs the
model needs mathematically (forward + backward), NOT the extra forward that activation
recomputation spends. Counting recomputation would give "hardware FLOPs utilisation" and
flatter a run that recomputes more; the field (PaLM, Megatron-LM, torchtitan) reports MFU.
"""

from __future__ import annotations

import re
import time

import torch

# Backward costs two forwards (one matmul for the input gradient, one for the weight
# gradient), so one training pass over a token costs three forwards.
_TRAIN_PASSES = 3


def flops_per_token(
    num_layers: int,
    hidden_size: int,
    seq_length: int,
    padded_vocab_size: int,
    ffn_hidden_size: int | None = None,
    gated: bool = False,
    kv_hidden_size: int | None = None,
) -> int:
    """Model FLOPs (forward + backward, no recomputation) to train on ONE token.

    A matmul of [m, k] x [k, n] costs 2*m*k*n FLOPs. Per token, with L = num_layers,
    h = hidden_size, s = seq_length, V = padded_vocab_size, f = ffn_hidden_size (default 4h,
    the activation's output width):

        per layer:  QKV 2*h*3h + attention dense 2*h*h + MLP 2*h*f*2
                    + scores QK^T 2*s*h + scores x V 2*s*h
                  = 8h^2 + 4hf + 4sh

    A gated MLP (swiglu...) projects to 2f, so its MLP costs 2*h*f*3; grouped-query attention
    (kv_hidden_size = num_kv_heads x head dim, default h) projects keys and values to that width,
    so QKV costs 2*h*(h + 2*kv_hidden_size). The score matmuls are per query head: unchanged.
        output layer: 2*h*V        (the input embedding is a lookup: 0 FLOPs)

        forward  = L*(8h^2 + 4hf + 4sh) + 2hV
        training = 3 * forward

    With f = 4h this is 72*L*h^2 * (1 + s/(6h) + V/(12*L*h)), Megatron-LM's formula
    96*B*s*L*h^2 * (1 + s/(6h) + V/(16*L*h)) per iteration without the recomputed forward
    of the layers, divided by the B*s tokens of the iteration. Attention uses the full s
    (no halving for the causal mask), the usual Megatron convention. Norms, biases,
    activations and softmax are elementwise and left out, as in that formula.
    """
    for name, value in (
        ("num_layers", num_layers),
        ("hidden_size", hidden_size),
        ("seq_length", seq_length),
        ("padded_vocab_size", padded_vocab_size),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    h = hidden_size
    f = 4 * h if ffn_hidden_size is None else ffn_hidden_size
    if f <= 0:
        raise ValueError(f"ffn_hidden_size must be positive, got {ffn_hidden_size}")
    kv = h if kv_hidden_size is None else kv_hidden_size
    s = seq_length
    qkv = 2 * h * (h + 2 * kv)
    attention_dense = 2 * h * h
    mlp = 2 * h * f * (3 if gated else 2)
    attention_scores = 2 * s * h + 2 * s * h
    per_layer = qkv + attention_dense + mlp + attention_scores
    output_layer = 2 * h * padded_vocab_size
    forward = num_layers * per_layer + output_layer
    return _TRAIN_PASSES * forward


def measure_matmul_peak(
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    n: int = 1024,
    seconds: float = 1.0,
    repeats: int = 5,
) -> float:
    """Best FLOP/s over `repeats` timed bursts of n x n matmuls in `dtype` on `device`.

    Used as the "peak" where no datasheet number is known (CPUs, unlisted GPUs): it is
    what this device reaches on the friendliest possible workload, so MFU against it
    stays meaningful, if optimistic compared with a datasheet peak. The best burst, not
    the mean, is taken because another process sharing the device only ever slows a
    burst down: the fastest one is the closest to what the device can do. Each timed
    burst lasts `seconds / repeats` to twice that, so the whole measurement takes from
    `seconds` to a little over twice that.
    """
    if repeats < 1 or seconds <= 0:
        raise ValueError(f"need repeats >= 1 and seconds > 0, got {repeats} and {seconds}")
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def burst(iters: int) -> float:
        """Seconds for `iters` matmuls, finished."""
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        # CUDA kernels are asynchronous: without a synchronize the clock would time
        # only the launches.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    # Warm-up: the first calls pay for library initialisation and kernel selection.
    burst(2)
    # Double the burst until it lasts long enough for the clock and the synchronize not to
    # matter, then time `repeats` bursts of that size. Shorter bursts count too: overheads
    # only make them slower, never faster.
    iters, best, timed = 1, 0.0, 0
    while timed < repeats:
        elapsed = burst(iters)
        best = max(best, 2.0 * n**3 * iters / elapsed)
        if elapsed >= seconds / repeats:
            timed += 1
        else:
            iters *= 2
    return best


def utilisation(achieved_flops: float, peak_flops: float) -> tuple[float, float]:
    """(MFU, the peak to use from now on) for a device that achieved `achieved_flops`.

    A rate above the peak proves the peak estimate low: a start-up measurement taken while
    another job shared the device, or a datasheet entry that does not fit the part. The
    observed rate is then the best known lower bound on the true peak, so it becomes the peak
    and the MFU is 1.0: a utilisation above 100% is never reported.
    """
    if achieved_flops > peak_flops:
        return 1.0, achieved_flops
    return achieved_flops / peak_flops, peak_flops


# Dense (no 2:4 sparsity) tensor-core peaks per GPU, FLOP/s, from the vendors' datasheets
# (where a datasheet gives only the sparse figure, the dense one is half of it). Keys:
# "half" = bf16 and fp16 (equal on every listed part), "tf32" = fp32 matmuls on tensor
# cores, "fp32" = plain fp32 (IEEE) FMA throughput. None = the part has no fast path
# for that dtype (e.g. bf16 before Ampere): the peak is then measured instead.
# GeForce cards: the fp16/bf16 figure with fp32 accumulation (what PyTorch uses), which
# NVIDIA halves on consumer parts. Patterns are tried in order: specific names first
# ("H100 PCIe" before "H100", "GH200" before "H200"), and \b keeps "A10" off "A100"/"A10G".
_GPU_PEAKS: list[tuple[str, dict[str, float | None]]] = [
    (r"\bB200\b", {"half": 2250e12, "tf32": 1100e12, "fp32": 75e12}),
    (r"\bGH200\b", {"half": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bH200 NVL\b", {"half": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\bH200\b", {"half": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bH100 PCIe\b", {"half": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"\bH100 NVL\b", {"half": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\bH100\b", {"half": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM5
    (r"\bH800\b", {"half": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bA100\b", {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bA800\b", {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bL40S\b", {"half": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL40\b", {"half": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"half": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA40\b", {"half": 149.7e12, "tf32": 74.8e12, "fp32": 37.4e12}),
    (r"\bA10\b", {"half": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"\bRTX A6000\b", {"half": 154.8e12, "tf32": 77.4e12, "fp32": 38.7e12}),
    (r"\bRTX 4090\b", {"half": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"\bRTX 3090\b", {"half": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"\bV100.*PCIE", {"half": 112e12, "bf16": None, "tf32": None, "fp32": 14e12}),
    (r"\bV100\b", {"half": 125e12, "bf16": None, "tf32": None, "fp32": 15.7e12}),
    (r"\bT4\b", {"half": 65e12, "bf16": None, "tf32": None, "fp32": 8.1e12}),
    (r"\bMI300X\b|\bMI325X\b", {"half": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12}),
]

# Measured peaks, per (device, dtype): a measurement costs about a second of device
# time, so each process pays for it once.
_MEASURED: dict[tuple[str, torch.dtype], float] = {}


def _tf32_matmuls_enabled() -> bool:
    """Whether fp32 CUDA matmuls run on TF32 tensor cores under the current settings."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has the `fp32_precision` API (it also reflects the legacy setters);
    # reading the legacy `allow_tf32` raises once the new API has been used.
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def gpu_table_peak(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Datasheet dense peak for a GPU name, or None when the name or dtype is not listed."""
    if dtype in (torch.bfloat16, torch.float16):
        key = "bf16" if dtype == torch.bfloat16 else "fp16"
    elif dtype == torch.float32:
        key = "tf32" if tf32 else "fp32"
    else:
        return None
    for pattern, peaks in _GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if key in peaks:
                return peaks[key]
            return peaks.get("half") if key in ("bf16", "fp16") else None
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense FLOP/s of one `device` for matmuls in `dtype`, the MFU denominator.

    Known GPUs (by torch.cuda.get_device_name) use the datasheet table above. For float32
    the TF32 peak is used when TF32 matmuls are enabled (torch.backends.cuda.matmul
    fp32_precision "tf32", or set_float32_matmul_precision("high")), else the plain fp32
    peak: MFU is measured against the units the matmuls actually run on. CPUs, unlisted
    GPUs and unlisted dtypes fall back to measure_matmul_peak in `dtype` (the training
    dtype), cached per process. A measurement can still come out low (the device was
    busier at start-up than in training); `utilisation` then raises the peak to the rate
    training achieves, so MFU never exceeds 100%.
    """
    device = torch.device(device)
    if device.type == "cuda":
        # Resolve "cuda" to "cuda:N" so both spellings share one cache entry.
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
        peak = gpu_table_peak(name, dtype, tf32=_tf32_matmuls_enabled())
        if peak is not None:
            return peak
    key = (str(device), dtype)
    if key not in _MEASURED:
        # A GPU needs large matrices to approach its peak; a CPU is near its peak at 1024.
        n = 4096 if device.type == "cuda" else 1024
        _MEASURED[key] = measure_matmul_peak(dtype, device, n=n, seconds=1.0)
    return _MEASURED[key]
