"""Device and communication-backend choice: the one place that decides CUDA/NCCL vs CPU/gloo."""

from __future__ import annotations

import ctypes
import os
import platform

import torch


def device_type() -> str:
    """'cuda' when a GPU is visible, else 'cpu'. Set NEOX_DEVICE=cpu to force the CPU."""
    forced = os.environ.get("NEOX_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device() -> torch.device:
    """This process's device: its GPU (by LOCAL_RANK) or the CPU."""
    if device_type() == "cuda":
        index = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def default_backend(configured: str | None = None) -> str:
    """The torch.distributed backend: the configured one, else NCCL on GPUs and gloo on the CPU."""
    if configured:
        return configured
    return "nccl" if device_type() == "cuda" else "gloo"


def gpus_on_this_node() -> int:
    return torch.cuda.device_count() if device_type() == "cuda" else 0


def keep_freed_host_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves each allocation above 32 MiB with its own mmap and unmaps it on
    free. A CPU training step allocates and frees several such tensors (the logits, their fp32
    copy, the vocabulary-sized gradients), so every step page-faults in gigabytes of fresh
    zeroed pages: at hidden 512 / vocab 50k that is ~585k faults and ~2 s of kernel time in a
    4 s step (benchmarks/README.md). Turning off mmap for large blocks and trimming makes the
    step's memory come from the heap it already has: a quarter off that step, no faults after
    the first few steps. The cost is memory: the process keeps its peak, and freed blocks
    fragment the heap (measured there: 3.2 GB resident instead of 2.5 GB). Same as
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>; a user who sets either variable (to
    any value) keeps glibc's behaviour under their setting. Returns whether it was applied
    (glibc only).
    """
    if platform.libc_ver()[0] != "glibc" or {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & os.environ.keys():
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def allow_fp16_on_cpu() -> None:
    """Let DeepSpeed train in fp16 on any CPU.

    DeepSpeed's CPU accelerator reports fp16 as unsupported unless oneDNN has native fp16
    kernels (AVX512-FP16 or AMX), and the engine then refuses `fp16: {enabled: true}`. PyTorch
    computes fp16 on every CPU (through fp32 where there is no native kernel), so the loss
    scaling and fp16 checkpoints that GPU runs use stay testable on any machine, only slower."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        accelerator.is_fp16_supported = lambda: True
