"""The nested YAML blocks GPT-NeoX hands to DeepSpeed: ``optimizer``, ``zero_optimization``, ``fp16``, ``bf16``.

They are typed like the flat keys, so a typo inside a block names the nearest valid key. Keys that
DeepSpeed itself implements (ZeRO-3 prefetching, parameter/optimizer offload...) default to None,
meaning "DeepSpeed's own default": they reach DeepSpeed's JSON only when a config sets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# GPT-NeoX attention types that run here: both are PyTorch's fused scaled_dot_product_attention
# (flash kernels where the device has them).
ATTENTION_TYPES = ("global", "flash")


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def sub(cls: type, text: str) -> Any:
    """A nested config block."""
    return field(default_factory=cls, metadata={"doc": text})


OPTIMIZER_TYPES = ("Adam", "AdamW", "SGD")
"""Optimizers built here. GPT-NeoX compares optimizer.type case-insensitively; the loader stores
the spelling above. Its other types (lion, cpu_adam, ...) are refused in neox_only.py."""


@dataclass(frozen=True)
class OptimizerParams:
    """GPT-NeoX passes these to the optimizer's constructor; its defaults (OPT_PARAMS_DEFAULTS).
    weight_decay is not one of them: GPT-NeoX passes the top-level weight_decay instead."""

    lr: float = doc(0.001, "Peak learning rate (GPT-NeoX's default 0.001).")
    betas: list = doc([0.9, 0.999], "Adam/AdamW: coefficients of the running averages of gradient and its square.")
    eps: float = doc(1e-8, "Adam/AdamW: added to the denominator.")
    momentum: float = doc(0.0, "SGD only: momentum factor.")


@dataclass(frozen=True)
class OptimizerSpec:
    type: str = doc(
        "Adam", "'Adam' or 'AdamW' (both AdamW here: decoupled weight_decay, as GPT-NeoX's fused Adam) or 'SGD'; "
        "any letter case, as in GPT-NeoX. GPT-NeoX's other types are refused (docs/neox_compat.md).")
    params: OptimizerParams = sub(OptimizerParams, "Constructor arguments (block below).")


@dataclass(frozen=True)
class OffloadConfig:
    """DeepSpeed's offload_optimizer / offload_param blocks (ZeRO-Offload / ZeRO-Infinity)."""

    device: Literal["none", "cpu", "nvme"] | None = doc(None, "Where the state lives: 'cpu' or 'nvme'.")
    nvme_path: str | None = doc(None, "Directory on the NVMe device ('nvme' only).")
    pin_memory: bool | None = doc(None, "Page-locked CPU buffers (faster copies, more host memory).")
    buffer_count: int | None = doc(None, "Buffers of the NVMe pipeline.")
    buffer_size: int | None = doc(None, "offload_param: bytes per parameter buffer.")
    max_in_cpu: int | None = doc(None, "offload_param: parameter elements kept in CPU memory.")
    fast_init: bool | None = doc(None, "offload_optimizer: faster initialisation when offloading to NVMe.")
    ratio: float | None = doc(None, "offload_optimizer: fraction of the optimizer step run on the CPU.")
    pipeline_read: bool | None = doc(None, "offload_optimizer: overlap NVMe reads with the step.")
    pipeline_write: bool | None = doc(None, "offload_optimizer: overlap NVMe writes with the step.")


_DS = "DeepSpeed ZeRO option; DeepSpeed's default when unset"


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = doc(0, "ZeRO stage 0-3; fp16/bf16 at 0 runs as 1 (DeepSpeed 0.19's stage-0 mixed precision is broken).")
    allgather_partitions: bool = doc(True, "DeepSpeed ZeRO option.")
    allgather_bucket_size: int = doc(500_000_000, "DeepSpeed ZeRO option.")
    overlap_comm: bool = doc(False, "DeepSpeed ZeRO option.")
    reduce_scatter: bool = doc(True, "DeepSpeed ZeRO option.")
    reduce_bucket_size: int = doc(500_000_000, "DeepSpeed ZeRO option (gradient bucket bytes).")
    contiguous_gradients: bool = doc(False, "DeepSpeed ZeRO option.")
    cpu_offload: bool = doc(False, "Offload optimizer state to CPU memory (ZeRO 1-3); "
                                   "the same as offload_optimizer: {device: cpu}.")
    offload_optimizer: OffloadConfig | None = doc(None, "Optimizer state offload (ZeRO 1-3), DeepSpeed's block.")
    offload_param: OffloadConfig | None = doc(None, "Parameter offload (ZeRO 3), DeepSpeed's block.")
    sub_group_size: int | None = doc(None, f"Parameters per optimizer-step group; {_DS}.")
    elastic_checkpoint: bool | None = doc(None, f"{_DS}.")
    load_from_fp32_weights: bool | None = doc(None, f"{_DS}.")
    round_robin_gradients: bool | None = doc(None, f"{_DS}.")
    ignore_unused_parameters: bool | None = doc(None, f"{_DS}.")
    stage3_prefetch_bucket_size: int | None = doc(None, f"ZeRO 3: parameter elements fetched ahead; {_DS}.")
    stage3_param_persistence_threshold: int | None = doc(
        None, f"ZeRO 3: parameters smaller than this stay unpartitioned; {_DS}.")
    stage3_model_persistence_threshold: int | None = doc(None, f"ZeRO 3: cap of unpartitioned elements; {_DS}.")
    stage3_max_live_parameters: int | None = doc(None, f"ZeRO 3: gathered elements kept at most; {_DS}.")
    stage3_max_reuse_distance: int | None = doc(None, f"ZeRO 3: keep a parameter reused this soon; {_DS}.")
    stage3_gather_16bit_weights_on_model_save: bool | None = doc(
        None, f"ZeRO 3: also save gathered 16-bit weights; {_DS}.")
    stage3_gather_fp16_weights_on_model_save: bool | None = doc(
        None, f"Older name of stage3_gather_16bit_weights_on_model_save; {_DS}.")


@dataclass(frozen=True)
class FP16Config:
    enabled: bool = doc(False, "Train in fp16 with dynamic loss scaling.")
    fp16: bool | None = doc(None, "GPT-NeoX's alias of enabled.")
    type: str | None = doc(None, "GPT-NeoX writes 'bfloat16' here to mean bf16.")
    loss_scale: float = doc(0.0, "0 = dynamic loss scaling; otherwise a fixed scale.")
    loss_scale_window: int = doc(1000, "Steps without overflow before the scale doubles.")
    initial_scale_power: int = doc(16, "Dynamic scaling starts at 2**this.")
    hysteresis: int = doc(2, "Overflows tolerated before the scale is lowered.")
    min_loss_scale: float = doc(1.0, "The scale never drops below this.")


@dataclass(frozen=True)
class BF16Config:
    enabled: bool = doc(False, "Train in bf16 (fp32 master weights in the optimizer).")
