"""The choices inside a transformer layer that GPT-NeoX names by strings: MLP activations and
per-layer attention types. Pure functions of the config, so validation can call them too."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from megatron.config.blocks import ATTENTION_TYPES

Activation = Callable[[torch.Tensor], torch.Tensor]


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # GPT-NeoX's swish (beta 1): the same function as silu


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# name: (function, gated). A gated MLP's first linear outputs [value; gate] per tensor-parallel
# rank and the layer computes f(gate) * value (GPT-NeoX's Gated_Activation; Llama's SwiGLU is
# silu(gate_proj x) * up_proj x). "gelu" is resolved in `activation` (exact or tanh).
ACTIVATIONS: dict[str, tuple[Activation, bool]] = {
    "relu": (F.relu, False), "softsign": (F.softsign, False), "swish": (_swish, False), "mish": (F.mish, False),
    "silu": (F.silu, False),
    "swiglu": (F.silu, True), "geglu": (F.gelu, True), "reglu": (F.relu, True), "bilinear": (_identity, True),
    "glu": (torch.sigmoid, True),
}


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def activation(name: str, bias_gelu_fusion: bool = False) -> tuple[Activation, bool]:
    """(function, gated) for GPT-NeoX's `activation` name. GPT-NeoX's fused bias-GELU kernel is
    the tanh approximation, so plain "gelu" follows `bias_gelu_fusion`; geglu's GELU is exact."""
    if name == "gelu":
        return (_tanh_gelu if bias_gelu_fusion else F.gelu), False
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of 'gelu', {', '.join(map(repr, ACTIVATIONS))}")
    return ACTIVATIONS[name]




def expand_attention_config(attention_config: list | None, num_layers: int) -> list[str]:
    """GPT-NeoX's `attention_config` as one type per layer.

    [[["global", "flash"], 2], [["flash"], "all"]] style: each entry is a pattern of types and
    how many times it repeats ("all": as often as fits num_layers); a flat list of strings is
    already expanded. None: every layer "global". The result must have num_layers entries and
    only types this framework runs."""
    if attention_config is None:
        return ["global"] * num_layers
    if all(isinstance(t, str) for t in attention_config):
        types = list(attention_config)
    else:
        types = []
        for pattern, count in attention_config:
            pattern = [pattern] if isinstance(pattern, str) else pattern  # [["flash", 4]]: one type
            if count == "all":
                if num_layers % len(pattern):
                    raise ValueError(f"attention_config: pattern {pattern} does not tile {num_layers} layers")
                count = num_layers // len(pattern)
            types.extend(list(pattern) * count)
    if len(types) != num_layers:
        raise ValueError(f"attention_config gives {len(types)} layer types for num_layers {num_layers}")
    for t in types:
        if t not in ATTENTION_TYPES:
            raise ValueError(f"attention type {t!r} is not implemented; use 'global' or 'flash'")
    return types
