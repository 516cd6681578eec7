"""Weight initialisation methods, by GPT-NeoX's names.

Each returns the standard deviation of a zero-mean normal; layers draw from a generator seeded
per layer (see `layer_generator`), so a layer's weights do not depend on which pipeline stage
or process builds it.
"""

from __future__ import annotations

import math

import torch

from megatron.config.schema import ModelConfig


def init_std(method: str, model: ModelConfig) -> float:
    h, layers, base = model.hidden_size, model.num_layers, model.init_method_std
    if method == "normal":
        return base
    if method == "scaled_normal":  # Megatron: output projections shrink with depth
        return base / math.sqrt(2.0 * layers)
    if method == "small_init":  # Nguyen & Salazar (2019), used by GPT-NeoX-20B
        return math.sqrt(2.0 / (5.0 * h))
    if method == "wang_init":  # Wang (2021), GPT-NeoX-20B's output projections
        return 2.0 / (layers * math.sqrt(h))
    raise ValueError(f"unknown init method {method!r}")


def layer_generator(seed: int, layer_index: int) -> torch.Generator:
    """A CPU generator for one layer of the layer list: same weights on every layout."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed * 1_000_003 + layer_index)
    return gen
