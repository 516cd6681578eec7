"""Exact parameter counts, from the model built on the meta device (nothing is allocated: the 20B
is counted by building its layer list on "meta"), and the split of layers into pipeline stages.

The memory and step-time model that uses them is megatron/planning (docs/planner.md).
"""

from __future__ import annotations

from megatron.config.config import NeoXConfig
from megatron.model.gpt import GPTModel, layer_defs


def meta_model(cfg: NeoXConfig) -> GPTModel:
    d = cfg.derived
    if d.padded_vocab_size is None:
        raise ValueError("the vocabulary size is unknown: set vocab_size or a tokenizer")
    defs = layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                      cfg.training.seed, device="meta", vocab_size=d.vocab_size)
    return GPTModel(defs)


def stage_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Transformer layers per stage, balanced as DeepSpeed's 'type:transformer' partitioning."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges
