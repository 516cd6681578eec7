"""Writes a checkpoint the way GPT-NeoX's released 20B files are laid out, for tests.

Written independently of megatron/checkpointing (plain torch.chunk / torch.save), so the reader
is checked against the format rather than against itself: pipeline layout at TP 2, one
`layer_XX-model_YY-model_states.pt` per layer and rank, the 20B-era MLP names (or the current
linear1/linear2 with `new_names`), `attention.rotary_emb.inv_freq` in old files only,
row-parallel biases split into random shares that only their SUM recovers (GPT-NeoX's parallel
residual), GPT-NeoX's client state (`args`, NumPy RNG state, no `rng`/`consumed_samples` of
ours), `latest`, no optimizer files, and the YAML config under configs/.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import yaml

COLUMN = ("attention.query_key_value.", "mlp.dense_h_to_4h.", "word_embeddings.", "final_linear.")
ROW_WEIGHT = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
ROW_BIAS = ("attention.dense.bias", "mlp.dense_4h_to_h.bias")


def _shards(key: str, full: torch.Tensor, tp: int, gen: torch.Generator) -> list[torch.Tensor]:
    if key.startswith(COLUMN):
        return list(full.chunk(tp, dim=0))
    if key in ROW_WEIGHT:
        return list(full.chunk(tp, dim=1))
    if key in ROW_BIAS:  # random shares: taking one rank's bias would be visibly wrong
        shares = [torch.randn(full.shape, generator=gen) for _ in range(tp - 1)]
        return [full - sum(shares), *shares]
    return [full] * tp


def write_neox_checkpoint(save: Path, layers: dict[int, dict[str, torch.Tensor]], config: dict, tp: int = 2,
                          pp: int = 4, iteration: int = 150, new_names: bool = False) -> Path:
    """`layers`: layer number -> whole tensors (our names, inv_freq included for rotary layers)."""
    gen = torch.Generator().manual_seed(7)
    tag = save / f"global_step{iteration}"
    (tag / "configs").mkdir(parents=True)
    for number, tensors in layers.items():
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for key, full in tensors.items():
            if new_names and key.endswith("inv_freq"):
                continue  # current GPT-NeoX keeps inv_freq out of the state dict
            name = key.replace("mlp.dense_h_to_4h.", "mlp.linear1.").replace("mlp.dense_4h_to_h.", "mlp.linear2.") \
                if new_names else key
            for rank, shard in enumerate(_shards(key, full, tp, gen)):
                per_rank[rank][name] = shard.clone()
        for rank in range(tp):
            torch.save(per_rank[rank], tag / f"layer_{number:02d}-model_{rank:02d}-model_states.pt")
    client = {
        "module": None, "iteration": iteration, "dp_world_size": 12, "mp_world_size": tp * pp,
        "args": {"num_layers": config["num_layers"], "hidden_size": config["hidden_size"],
                 "num_attention_heads": config["num_attention_heads"], "model_parallel_size": tp},
        "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }
    for mp_rank in range(tp * pp):
        torch.save(client, tag / f"mp_rank_{mp_rank:02d}_model_states.pt")
    (tag / "configs" / "model.yml").write_text(yaml.safe_dump(config))
    (save / "latest").write_text(tag.name)
    return tag
