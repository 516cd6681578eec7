"""Saving and resuming: DeepSpeed's checkpoint layout plus what DeepSpeed does not keep.

Layout (docs/checkpoints.md): SAVE/global_stepN/ holds DeepSpeed's files (per-layer model states
with the pipeline engine, optimizer shards, engine state with our client state), plus
configs/ with the YAML files of the run. SAVE/latest names the tag and is written last, by rank 0,
through a rename, so a crash mid-save never leaves `latest` pointing at a partial checkpoint.

Client state carries the iteration, consumed samples and the RNG states (Python, NumPy, torch,
CUDA), so a resumed run continues bit for bit. GPT-NeoX's switches leave parts out: `no_save_optim`
(weights only: a resume then loads them like a new layout, `no_load_optim` keeps the RNG too),
`no_save_rng` (a resume needs `no_load_rng`), and `no_load_rng` (resume with this run's seeds).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpointing import universal
from megatron.checkpointing.errors import CheckpointError
from megatron.checkpointing.loading import LoadPlan
from megatron.checkpointing.reader import list_tags, resolve_tag
from megatron.parallel import random as tp_random



def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tensor_parallel": tp_random.get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tp_random.set_states(state["tensor_parallel"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine: Any, save_dir: str, iteration: int, consumed_samples: int,
                    config_files: tuple[str, ...], keep_last_n: int | None,
                    description: dict[str, Any] | None = None, save_optim: bool = True,
                    save_rng: bool = True) -> Path:
    """`description` (reader.describe) marks the files as ours and records the architecture,
    so tools and other layouts can read them without the YAML files. Without `save_optim` no
    optimizer state is written (no *optim_states.pt, none in the engine file); without
    `save_rng` no RNG states."""
    tag = tag_for(iteration)
    client = {**(description or {}), "iteration": iteration, "consumed_samples": consumed_samples}
    if save_rng:
        client["rng"] = rng_state()
    if not save_optim:
        # Client state is merged over DeepSpeed's own entries, so this replaces the optimizer
        # state ZeRO 0 keeps in the engine file; ZeRO >= 1 writes it to shards, skipped below.
        client["optimizer"] = None
    path = Path(save_dir) / tag
    if _rank() == 0:  # a conversion of an earlier save under this tag would be reused: stale
        shutil.rmtree(path / universal.FOLDER, ignore_errors=True)
    # The engine's own switch for this rank's optimizer shards, set at init; off for this save.
    skip_shards = not save_optim and engine.save_zero_checkpoint
    if skip_shards:
        engine.save_zero_checkpoint = False
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client, save_latest=False)
    finally:
        if skip_shards:
            engine.save_zero_checkpoint = True
    if _rank() == 0:
        configs = path / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        for f in config_files:
            shutil.copy2(f, configs / Path(f).name)
    _barrier()  # every rank's shards are written...
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        _flush(path)  # ...and on disk, from each node's page cache, before `latest` moves
    _barrier()
    if _rank() == 0:
        tmp = Path(save_dir) / "latest.tmp"
        tmp.write_text(tag)
        _flush(tmp)
        os.replace(tmp, Path(save_dir) / "latest")
        _flush(Path(save_dir))  # the rename itself
        if keep_last_n:
            prune(save_dir, keep_last_n)
    _barrier()
    return path


def _flush(path: Path) -> None:
    """fsync a file, or a directory and every file below it: a power loss or a node crash after
    `latest` moved must not leave it naming files that were still only in memory."""
    targets = [path] if path.is_file() else [*(p for p in path.rglob("*") if p.is_file()), path]
    for target in targets:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prune(save_dir: str, keep_last_n: int) -> None:
    """Delete all but the newest `keep_last_n` checkpoints (never the one `latest` names)."""
    latest = (Path(save_dir) / "latest").read_text().strip()
    for tag in list_tags(Path(save_dir))[keep_last_n:]:
        if tag != latest:
            shutil.rmtree(Path(save_dir) / tag)


def latest_tag(load_dir: str) -> str | None:
    if not (Path(load_dir) / "latest").is_file():
        return None
    return resolve_tag(Path(load_dir), None)


def load_checkpoint(engine: Any, plan: LoadPlan | None, finetune: bool, load_optim: bool,
                    samples_per_iteration: int, load_rng: bool = True) -> tuple[int, int] | None:
    """Resume as `plan` says (megatron/checkpointing/loading.py). Returns (iteration,
    consumed_samples), or None when there is nothing to load. `finetune` restarts at iteration 0.
    A resharded plan has put the weights into the module already; what is left is the position
    and the learning-rate schedule. A universal plan loads like a native one, from the converted
    folder. Without `load_rng` the RNG states stay as this run's seed made them."""
    if plan is None:
        return None
    reader = plan.reader
    if plan.way == "resharded":
        if finetune:
            return 0, 0
        # DeepSpeed restores the schedule only with the optimizer; without this the rate would
        # restart its warmup at the resumed iteration.
        engine.lr_scheduler.load_state_dict(reader.client.get("lr_scheduler") or {"num_iters": reader.iteration})
        # GPT-NeoX's client state has no sample count: every step consumed one global batch.
        consumed = reader.client.get("consumed_samples", reader.iteration * samples_per_iteration)
        return reader.iteration, int(consumed)
    root, tag = reader.root, reader.tag
    if plan.way == "universal":  # the engine was configured with load_universal (deepspeed_config)
        root, tag = reader.path, universal.prepare(reader).name
    try:  # AssertionError: DeepSpeed's universal loader checks shapes with assert
        path, client = engine.load_checkpoint(
            str(root), tag=tag, load_module_only=False,
            load_optimizer_states=load_optim, load_lr_scheduler_states=True,
        )
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, AssertionError) as err:
        raise CheckpointError(f"cannot load checkpoint {reader.path}: {err}") from err
    if path is None:
        raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {reader.path}")
    if client is None or "iteration" not in client:
        raise CheckpointError(f"{reader.path}: no training state (iteration) in the engine file")
    if load_rng:
        if "rng" not in client:
            raise CheckpointError(f"{reader.path} holds no RNG states (saved with no_save_rng); set no_load_rng: "
                                  "true to resume with this run's seeds, or finetune: true")
        set_rng_state(client["rng"])
    return int(client["iteration"]), int(client["consumed_samples"])
