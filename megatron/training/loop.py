"""The training loop: step, log, evaluate, checkpoint. Nothing else lives here.

`pretrain` is the worker entry: it builds the pieces (`megatron.training.setup`) and runs the
loop. Logging, evaluation and checkpointing are called at their intervals; none of them changes
what the step computes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from megatron.config import NeoXConfig
from megatron.data.loader import eval_batches, micro_batches
from megatron.training.flops import utilisation
from megatron.training.preemption import Preemption
from megatron.training.resume import resume, save as checkpoint
from megatron.training.setup import RunState, build_run, lost_another_rank, shutdown_distributed


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says what to change."""


@dataclass
class IntervalStats:
    """Sums over the current log interval, reset after every log line."""

    losses: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.losses.clear()
        self.start = time.perf_counter()


def evaluate(run: RunState, iteration: int, dataset: Any, split: str) -> float | None:
    """Mean loss over eval_iters batches of `dataset` (the validation or test split), logged as `split`."""
    cfg, d = run.cfg, run.cfg.derived
    if dataset is None or cfg.training.eval_iters <= 0:
        return None
    data = eval_batches(dataset, d.micro_batch_size, d.data_parallel_size, run.dp_rank, run.mask_token)
    losses = [run.stepper.eval_batch(data) for _ in range(cfg.training.eval_iters)]
    loss = sum(losses) / len(losses)
    run.logger.log_eval(iteration, {"lm_loss": loss}, split)
    return loss


def evaluate_tasks(run: RunState, iteration: int) -> None:
    """The eval_tasks (lm-evaluation-harness), logged as records of type "tasks"."""
    if run.tasks is not None:
        run.logger.log_tasks(iteration, run.tasks())


def _log(run: RunState, iteration: int, stats: IntervalStats) -> None:
    d = run.cfg.derived
    elapsed = time.perf_counter() - stats.start
    n = len(stats.losses)
    tokens_per_sec = d.train_batch_size * run.cfg.model.seq_length * n / elapsed
    tflops = run.flops_per_token * tokens_per_sec / d.world_size / 1e12
    mfu, peak = utilisation(tflops * 1e12, run.peak_flops)
    if peak > run.peak_flops:
        run.print(f"MFU: {tflops:.3g} TFLOPS achieved is above the {run.peak_flops / 1e12:.3g} TFLOPS peak "
                  "estimated so far; the peak is re-estimated as this rate (megatron/training/flops.py)")
        run.peak_flops = peak
    metrics = {
        "lm_loss": sum(stats.losses) / n,
        "lr": run.scheduler.get_lr(),
        "grad_norm": run.stepper.grad_norm(),
        "loss_scale": run.stepper.loss_scale(),
        "skipped_iters": run.stepper.skipped_steps,
        "tokens_per_sec": tokens_per_sec,
        "ms_per_iter": 1000 * elapsed / n,
        "tflops": tflops,
        "mfu": mfu,
    }
    run.logger.log_train(iteration, {k: v for k, v in metrics.items() if v is not None})
    stats.reset()


def train(run: RunState) -> list[float]:
    """Run from the loaded iteration to train_iters, or to the next multiple of exit_interval, or
    until a signal (megatron/training/preemption.py): checkpointed, so that the same command
    resumes. Returns the losses."""
    cfg, d = run.cfg, run.cfg.derived
    ck = cfg.checkpoint
    preemption = Preemption(run.stepper.engine.device)  # from here on a signal means: save and stop
    iteration, consumed = resume(run)
    data = micro_batches(run.train, consumed, d.micro_batch_size, d.data_parallel_size, run.dp_rank,
                         run.mask_token)
    stats, losses, last_saved = IntervalStats(), [], None

    def save() -> None:
        nonlocal last_saved
        checkpoint(run, iteration, consumed)
        last_saved = iteration

    start, end, save_iters = iteration, d.train_iters, set(d.save_iters)
    if cfg.training.exit_interval:  # GPT-NeoX's meaning: stop at the next multiple
        end = min(end, (start // cfg.training.exit_interval + 1) * cfg.training.exit_interval)
    if start >= end:
        # Nothing to do: evaluating and saving again would rewrite the checkpoint that
        # `latest` points to.
        run.print(f"nothing to train: at iteration {start} of train_iters {d.train_iters}")
        return losses
    while iteration < end:
        loss = run.stepper.train_batch(data)
        iteration += 1
        if not math.isfinite(loss) and d.precision != "fp16":  # fp16 skips such steps itself
            kept = f", so {ck.save}/latest still names the last good checkpoint" if ck.save else ""
            raise TrainingError(f"iteration {iteration}: the loss is {loss} ({d.precision}); stopping without "
                                f"saving{kept}. Lower the learning rate or lengthen warmup, then resume")
        consumed += d.train_batch_size
        losses.append(loss)
        stats.losses.append(loss)
        if iteration % cfg.logging.log_interval == 0 or iteration == end:
            _log(run, iteration, stats)
        if cfg.training.eval_interval and iteration % cfg.training.eval_interval == 0:
            evaluate(run, iteration, run.valid, "validation")
            evaluate_tasks(run, iteration)
            stats.start = time.perf_counter()  # eval time is not training throughput
        if ck.save and iteration in save_iters:
            save()
        if preemption.agreed():
            if ck.save and last_saved != iteration:
                save()
            kept = f"; the same command resumes from {ck.save}" if ck.save else "; no save directory, nothing kept"
            run.print(f"stopping after iteration {iteration} on {preemption.received or 'a signal to another rank'}"
                      f"{kept}")
            return losses
    if not (cfg.training.eval_interval and iteration % cfg.training.eval_interval == 0):
        evaluate(run, iteration, run.valid, "validation")
        evaluate_tasks(run, iteration)
    if ck.save and last_saved != iteration:
        save()
    if iteration == d.train_iters:  # GPT-NeoX's do_test: the test split once, at the end of training
        evaluate(run, iteration, run.test, "test")
    return losses


def pretrain(cfg: NeoXConfig) -> list[float]:
    """Build everything for this rank, train, and shut down cleanly."""
    run = build_run(cfg)
    try:
        losses = train(run)
    except BaseException as err:
        run.logger.close()
        if not lost_another_rank(err):  # a barrier would wait for the lost rank too
            shutdown_distributed()
        raise
    run.logger.close()
    run.print(run.summary())
    shutdown_distributed()
    return losses
