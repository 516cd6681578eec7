"""Bodies of the multi-process generation tests (tests/generation/test_generate.py); each runs on
every rank of a gloo group."""

from __future__ import annotations

import torch

from megatron.config.schema import ModelConfig
from megatron.generation.generator import generate
from megatron.generation.sampling import Sampling
from megatron.model.gpt import GPTModel, layer_defs
from megatron.parallel.groups import SINGLE, ParallelGroups

VOCAB = 100  # real ids; the TP1 model pads to 128 rows, the TP2 one to 256
PROMPTS = [[5, 9, 17, 33, 2, 8, 99, 40], [7, 1], [60, 61, 62, 63, 64]]


def tp_generation_matches_single(rank: int, world: int, parallel_residual: bool) -> None:
    """Greedy and seeded sampled tokens of the TP model, with and without the cache, equal the
    single-process model's (the seeded init is layout- and padding-independent)."""
    tp = ParallelGroups(1, world, 1).tensor
    m = ModelConfig(pos_emb="rotary",
                    num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=48, rotary_pct=0.5,
                    gpt_j_residual=parallel_residual, no_weight_tying=not parallel_residual)
    single = GPTModel(layer_defs(m, 128, 256, 48, seed=11, vocab_size=VOCAB))
    sharded = GPTModel(layer_defs(m, 256, 256, 48, seed=11, tp=tp, vocab_size=VOCAB))
    for sampling in (Sampling(), Sampling(temperature=1.5, top_k=40, top_p=0.95)):
        for recompute in (False, True):
            got, want = (
                generate(model, PROMPTS, 16, eod=0, vocab_size=VOCAB, max_positions=48, sampling=sampling,
                         recompute=recompute, generator=torch.Generator().manual_seed(3), tp=t)
                for model, t in ((sharded, tp), (single, SINGLE))
            )
            assert got == want, (sampling, recompute, got, want)
            assert all(len(c.tokens) == 16 or c.finished for c in got)
            assert max(max(c.tokens, default=0) for c in got) < VOCAB
