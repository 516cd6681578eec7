"""Device and communication-backend choice: the one place that decides CUDA/NCCL vs CPU/gloo."""

from __future__ import annotations

import os

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
