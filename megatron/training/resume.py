"""Where a run starts (a checkpoint of `load`, or scratch) and how it saves, with the
checkpoint switches of the config applied: the loop calls `resume` once and `save` at its
save iterations, and knows nothing of the switches."""

from __future__ import annotations

import time
from pathlib import Path

from megatron.checkpointing.checkpoint import load_checkpoint, save_checkpoint
from megatron.checkpointing.reader import describe
from megatron.training.setup import RunState

# The config key of each schedule value (megatron/training/lr_schedule.py), for messages.
_SCHEDULE_KEYS = {"max_lr": "lr", "min_lr": "min_lr", "warmup_iters": "warmup iterations",
                  "decay_iters": "lr_decay_iters", "style": "lr_decay_style"}


def resume(run: RunState) -> tuple[int, int]:
    """(iteration, consumed samples) to start from, after loading `load` when there is one."""
    cfg, d, ck = run.cfg, run.cfg.derived, run.cfg.checkpoint
    if not ck.load:
        return 0, 0
    resumed = load_checkpoint(run.stepper.engine, run.load_plan, ck.finetune, not ck.no_load_optim,
                              d.train_batch_size, load_rng=not ck.no_load_rng)
    if resumed is None:
        run.print(f"no checkpoint in {ck.load}: starting from scratch")
        return 0, 0
    iteration, consumed = resumed
    run.print(f"resumed from {ck.load} at iteration {iteration} ({consumed} samples consumed; {run.load_plan.why})")
    if iteration and run.scheduler.changes:
        run.print(schedule_notice(run.scheduler.changes, iteration, cfg.lr.use_checkpoint_lr_scheduler,
                                  cfg.lr.override_lr_scheduler))
    return iteration, consumed


def schedule_notice(changes: list[tuple[str, object, object]], iteration: int, use_checkpoint: bool,
                    override: bool) -> str:
    """One line on the schedule values that differ between the checkpoint and this config, and
    which of them the run follows."""
    diff = "; ".join(f"{_SCHEDULE_KEYS[f]} {saved} in the checkpoint, {mine} in this config"
                     for f, saved, mine in changes)
    if use_checkpoint:
        return f"learning-rate schedule: {diff}: following the checkpoint's (use_checkpoint_lr_scheduler)"
    if override:
        return f"learning-rate schedule: {diff}: following this config's (override_lr_scheduler)"
    return (f"learning-rate schedule: {diff}: from iteration {iteration} the rate follows this config; set "
            "use_checkpoint_lr_scheduler: true to keep the checkpoint's schedule, or override_lr_scheduler: "
            "true to follow this config without this notice")


def save(run: RunState, iteration: int, consumed: int) -> Path:
    """Checkpoint this iteration into `save`, leaving out what no_save_optim / no_save_rng say."""
    cfg, d, ck = run.cfg, run.cfg.derived, run.cfg.checkpoint
    began = time.perf_counter()
    path = save_checkpoint(run.stepper.engine, ck.save, iteration, consumed, cfg.config_files,
                           ck.keep_last_n_checkpoints, describe(cfg.model, d.vocab_size, d.padded_vocab_size),
                           save_optim=not ck.no_save_optim, save_rng=not ck.no_save_rng)
    run.print(f"saved checkpoint {path} in {time.perf_counter() - began:.2f} s")
    return path
