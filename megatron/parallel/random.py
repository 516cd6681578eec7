"""RNG streams for dropout under tensor parallelism.

Where activations are replicated across tensor-parallel ranks (the residual stream without
sequence parallelism) every rank must draw the SAME dropout mask: that is the default generator,
seeded identically on all ranks. Where activations are split (attention heads, sequence shards)
masks must DIFFER between ranks, or the split units would be dropped in lockstep: those draws run
inside `tp_rng()`, a second stream seeded with seed + 2718 + tensor rank (Megatron's offset).

Activation checkpointing recomputes the forward; `checkpoint_context` makes the recomputation
see the tensor-parallel stream as it was, so recomputed masks equal the original ones.
`partitioned_checkpoint` is the same for DeepSpeed's checkpoint with `partition_activations`
(GPT-NeoX's way to cut checkpoint memory under tensor parallelism without sequence parallelism).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

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


def _replaying_tp_stream(function: Callable) -> Callable:
    """`function` whose second call (the recompute in backward) sees the tensor-parallel stream
    as the first call did. DeepSpeed restores torch's and its own RNG states, not ours."""
    at_forward: dict[str, torch.Tensor] | None = None

    def run(*args: Any) -> Any:
        nonlocal at_forward
        if at_forward is None:
            at_forward = get_states()
            return function(*args)
        now = get_states()
        set_states(at_forward)
        try:
            return function(*args)
        finally:
            set_states(now)

    return run


def partitioned_checkpoint(mpu: Any) -> Callable:
    """An `activation_checkpoint_func` for DeepSpeed's PipelineModule that keeps each checkpointed
    layer input split over the tensor-parallel ranks of `mpu` (1/tp of it per rank) and
    all-gathers it for the recompute: DeepSpeed's non-reentrant checkpoint with
    partition_activations. DeepSpeed takes the group from `mpu.get_tensor_model_parallel_*`, so
    pipeline stages (which hold different activations) never gather each other's."""
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing

    ds_checkpointing.configure(mpu, partition_activations=True)

    def checkpoint(function: Callable, *args: Any) -> Any:
        return ds_checkpointing.non_reentrant_checkpoint(_replaying_tp_stream(function), *args)

    return checkpoint
