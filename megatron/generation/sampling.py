"""Choosing the next token from logits: greedy, temperature, top-k, top-p (GPT-NeoX's keys).

Order, as GPT-NeoX: ids >= vocab_size (tensor-parallel padding) are cut off, then temperature
0 means argmax; otherwise logits / temperature, then top-k, then top-p, then one draw from the
softmax of what is left. Everything runs in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy. top_k 0 and top_p 0: no filtering (GPT-NeoX's defaults)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0


def real_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits [b, vocab_size] of the real ids only: padding rows are never chosen, whatever
    the output layer gave them, and a draw does not depend on the padding (torch.multinomial
    consumes random numbers per column, so the padded width would change the samples)."""
    return logits[..., :vocab_size].float()


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf outside the k largest logits of each row (ties with the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """-inf outside the nucleus: the most probable tokens, in order, until their probability
    reaches p (a token is kept when the mass of those before it is below p, so the first always is)."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, vocab_size: int, sampling: Sampling,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [b] from logits [b, padded_vocab]; `generator` makes draws reproducible."""
    logits = real_vocabulary(logits, vocab_size)
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / sampling.temperature, sampling.top_k), sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
