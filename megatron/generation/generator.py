"""Batched decoding with a key/value cache, on one tensor-parallel group.

Prompts of different lengths share a batch by LEFT padding: every row ends at the same column,
so the newest token of every row is the last column and one forward per step serves all rows.
Each token's position counts from its own row's first real token (padding takes no position),
and the attention mask hides the padding columns from every query; a padding query attends to
itself only, which keeps its (unused) outputs finite.

With the cache the prompt is run once (prefill) and every later step feeds one token per row;
`recompute=True` runs the whole sequence every step instead (GPT-NeoX's `recompute`), the
reference the cache must match. Only the last position goes through the final norm and output
layer. Rows stop at the end-of-text id; the batch stops when all rows have, after
`max_new_tokens`, or when the longest row reaches `max_positions` tokens.

Under tensor parallelism every rank runs the same loop on its heads; the vocabulary-split
logits are gathered and tensor rank 0's choice is broadcast, so the ranks never diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.generation.sampling import Sampling, sample
from megatron.model.gpt import Embedding, FinalNorm, GPTModel
from megatron.model.transformer import DecodeStep, KVCache, TransformerLayer
from megatron.parallel.comm import gather_last_dim
from megatron.parallel.groups import SINGLE, TensorParallel


@dataclass(frozen=True)
class Completion:
    tokens: list[int]  # generated ids, the end-of-text id excluded
    finished: bool  # True when the row ended with the end-of-text id


def attention_mask(pad: torch.Tensor, first_query: int, total: int) -> torch.Tensor:
    """[b, 1, total - first_query, total] bool: query column q may see key column k when
    k <= q and k is not padding (k >= pad[row]); a padding query sees only itself."""
    keys = torch.arange(total, device=pad.device)
    queries = torch.arange(first_query, total, device=pad.device).unsqueeze(-1)
    allowed = (keys <= queries) & (keys >= pad.view(-1, 1, 1))
    return (allowed | (keys == queries)).unsqueeze(1)


def positions(pad: torch.Tensor, first: int, total: int) -> torch.Tensor:
    """[b, total - first]: each column's position in its row (0 at the first real token)."""
    cols = torch.arange(first, total, device=pad.device)
    return (cols - pad.view(-1, 1)).clamp(min=0)


def forward(model: GPTModel, tokens: torch.Tensor, step: DecodeStep, caches: list[KVCache] | None) -> torch.Tensor:
    """Logits of the LAST column only ([b, vocab / tp]): the model's layer list run with the
    step's positions and mask (and the caches) instead of GPTModel.forward's 0..s-1 causal."""
    x = tokens
    layer = 0
    for index, fn in model.steps:
        if index is None:
            x = fn(x)
            continue
        module = model.layers[index]
        if fn is not None:  # tied output layer
            x = fn(module, x)
        elif isinstance(module, Embedding):
            x = module.word_embeddings(tokens)
            if module.position_embeddings is not None:
                x = x + module.position_embeddings(step.positions)
        elif isinstance(module, TransformerLayer):
            x = module(x, step, None if caches is None else caches[layer])
            layer += 1
        else:
            if isinstance(module, FinalNorm):
                x = x[:, -1:]  # the norm and output layer are per token: only the last is needed
            x = module(x)
    return x[:, -1]


def new_caches(model: GPTModel, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
    return [KVCache(batch, m.attention.kv_heads, m.attention.head_dim, capacity, dtype, device)
            for m in model.layers if isinstance(m, TransformerLayer)]


def _choose(logits: torch.Tensor, vocab_size: int, sampling: Sampling, generator: torch.Generator | None,
            tp: TensorParallel) -> torch.Tensor:
    choice = sample(gather_last_dim(logits, tp), vocab_size, sampling, generator)
    if tp.size > 1:  # identical on every rank already; the broadcast guarantees it
        dist.broadcast(choice, group=tp.group, group_src=0)
    return choice


@torch.no_grad()
def generate(
    model: GPTModel, prompts: list[list[int]], max_new_tokens: int, eod: int, vocab_size: int,
    max_positions: int, sampling: Sampling = Sampling(), recompute: bool = False,
    generator: torch.Generator | None = None, tp: TensorParallel = SINGLE,
) -> list[Completion]:
    """Complete a batch of non-empty token lists (each shorter than max_positions)."""
    if any(not p or len(p) >= max_positions for p in prompts):
        raise ValueError(f"every prompt needs 1 to {max_positions - 1} tokens")
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    longest = max(len(p) for p in prompts)
    steps = min(max_new_tokens, max_positions - longest)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[eod] * (longest - len(p)) + p for p in prompts], device=device)
    caches = None if recompute else new_caches(model, len(prompts), longest + steps, dtype, device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = torch.full((len(prompts), steps), eod, device=device)
    total, fed = longest, 0  # columns so far; columns already in the caches
    for t in range(steps):
        first = 0 if recompute else fed
        step = DecodeStep(positions(pad, first, total), attention_mask(pad, first, total))
        logits = forward(model, tokens[:, first:total], step, caches)
        fed = total
        choice = _choose(logits, vocab_size, sampling, generator, tp).masked_fill(done, eod)
        out[:, t] = choice
        done |= choice == eod
        tokens = torch.cat([tokens, choice.unsqueeze(1)], dim=1)
        total += 1
        if bool(done.all()):
            break
    completions = []
    for row, finished in zip(out.tolist(), done.tolist()):
        n = row.index(eod) if finished else len(row)
        completions.append(Completion(row[:n], finished))
    return completions
