"""RNG streams for dropout under tensor parallelism.

Where activations are replicated across tensor-parallel ranks (the residual stream without
sequence parallelism) every rank must draw the SAME dropout mask: that is the default generator,
seeded identically on all ranks. Where activations are split (attention heads, sequence shards)
masks must DIFFER between ranks, or the split units would be dropped in lockstep: those draws run
inside `tp_rng()`, a second stream seeded with seed + 2718 + tensor rank (Megatron's offset).

Activation checkpointing recomputes the forward; `checkpoint_context` makes the recomputation
see the tensor-parallel stream as it was, so recomputed masks equal the original ones.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megatron.parallel.device import device_type

_TP_STATE: dict[str, torch.Tensor] = {}


def _get() -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type() == "cuda" else torch.get_rng_state()


def _set(state: torch.Tensor) -> None:
    if device_type() == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def seed_tp_rng(seed: int, tp_rank: int) -> None:
    """Create the tensor-parallel stream; call once per process after seeding the default one."""
    saved = _get()
    torch.manual_seed(seed + 2718 + tp_rank)
    _TP_STATE["tp"] = _get()
    _set(saved)


@contextlib.contextmanager
def tp_rng() -> Iterator[None]:
    """Run the body on the tensor-parallel stream (no-op if it was never seeded)."""
    if "tp" not in _TP_STATE:
        yield
        return
    saved = _get()
    _set(_TP_STATE["tp"])
    try:
        yield
    finally:
        _TP_STATE["tp"] = _get()
        _set(saved)


def get_states() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _TP_STATE.items()}


def set_states(states: dict[str, torch.Tensor]) -> None:
    _TP_STATE.clear()
    _TP_STATE.update({k: v.clone() for k, v in states.items()})


def checkpoint_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for torch.utils.checkpoint: the recompute sees the stream as at forward."""
    at_forward = get_states()

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        now = get_states()
        set_states(at_forward)
        try:
            yield
        finally:
            set_states(now)

    return contextlib.nullcontext(), recompute()
