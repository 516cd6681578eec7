"""The DeepSpeed JSON config, derived from the same YAML (as GPT-NeoX does)."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.config.config import NeoXConfig
from megatron.config.neox_only import DS, TABLE


def framework_clips(cfg: NeoXConfig) -> bool:
    """fp32 without ZeRO: DeepSpeed clips there but throws the norm away, so the framework
    clips and reports it instead (`clip_in_optimizer` in megatron/training/optimizer.py)."""
    return cfg.derived.precision == "fp32" and cfg.derived.zero_stage == 0


def deepspeed_config(cfg: NeoXConfig, load_universal: bool = False) -> dict[str, Any]:
    """`load_universal`: the run resumes from a universal checkpoint (a ZeRO checkpoint of another
    data-parallel size, megatron/checkpointing/universal.py); DeepSpeed reads it only when the
    engine is built with this set."""
    opt, d = cfg.optimizer, cfg.derived
    zero = _set_only(dataclasses.asdict(opt.zero_optimization))
    zero["stage"] = d.zero_stage
    if zero.pop("cpu_offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_batch_size": d.train_batch_size,
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": d.gradient_accumulation_steps,
        # DeepSpeed 0.19 defaults clipping to 1.0: always pass a value.
        "gradient_clipping": 0.0 if framework_clips(cfg) else opt.gradient_clipping,
        "zero_optimization": zero,
        "steps_per_print": cfg.logging.steps_per_print,
        "wall_clock_breakdown": cfg.logging.wall_clock_breakdown,
        # The optimizer is built by us (param groups without decay on biases and norms).
        "zero_allow_untested_optimizer": True,
    }
    if d.precision in ("fp16", "bfloat16") and opt.fp32_allreduce:
        ds["communication_data_type"] = "fp32"
    for key, (_, default, kind, _) in TABLE.items():  # DeepSpeed's own keys, as the config gives them
        value = getattr(cfg.neox, key)
        if kind != DS or value == default:
            continue
        if key == "deepspeed_extra_args":
            ds.update(value)
        else:
            ds[key] = value
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if d.precision == "fp16":
        fp16 = opt.fp16
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": fp16.loss_scale,
            "loss_scale_window": fp16.loss_scale_window,
            "initial_scale_power": fp16.initial_scale_power,
            "hysteresis": fp16.hysteresis,
            "min_loss_scale": fp16.min_loss_scale,
        }
    elif d.precision == "bfloat16":
        ds["bf16"] = {"enabled": True}
    return ds


def _set_only(block: dict[str, Any]) -> dict[str, Any]:
    """A block without the keys left unset (None): DeepSpeed then applies its own defaults."""
    return {k: _set_only(v) if isinstance(v, dict) else v for k, v in block.items() if v is not None}
