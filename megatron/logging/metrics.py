"""One place where training and evaluation metrics go out: console, jsonl, TensorBoard, wandb.

The training loop hands plain dicts to `MetricsLogger.log_train` / `log_eval` / `log_tasks` and never
branches on which backends are on: that is decided once, in the constructor.

Metric keys the console line knows (others are shown after them with a generic format):
    lm_loss, lr, grad_norm, loss_scale, skipped_iters, tokens_per_sec, ms_per_iter,
    tflops (achieved model TFLOP/s per device), mfu (a FRACTION, 0.375 = 37.5%).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

# (metric key, console label, formatter) in console order. The formats follow
# Megatron/GPT-NeoX's log line: losses and lr in scientific notation, since they span
# orders of magnitude over a run.
_TRAIN_FIELDS: list[tuple[str, str, Callable[[float], str]]] = [
    ("lm_loss", "lm loss", lambda v: f"{v:.4E}"),
    ("lr", "lr", lambda v: f"{v:.3E}"),
    ("grad_norm", "grad norm", lambda v: f"{v:.3f}"),
    ("loss_scale", "loss scale", lambda v: f"{v:.1f}"),
    ("skipped_iters", "skipped", lambda v: f"{int(v)}"),
    ("tokens_per_sec", "tokens/s", lambda v: f"{v:,.0f}"),
    ("ms_per_iter", "ms/iter", lambda v: f"{v:.1f}"),
    ("tflops", "TFLOPS", lambda v: f"{v:.2f}"),
    ("mfu", "MFU", lambda v: f"{100 * v:.1f}%"),
]

_EVAL_FIELDS: list[tuple[str, str, Callable[[float], str]]] = [
    ("lm_loss", "lm loss", lambda v: f"{v:.4E}"),
    ("lm_loss_ppl", "PPL", lambda v: f"{v:.4E}"),
]

# exp(20) ~ 4.9e8 is already "untrained"; capping keeps an early huge loss from
# overflowing to inf (Megatron caps the same way).
_MAX_LOSS_FOR_PPL = 20.0


def _to_number(value: Any) -> int | float:
    """Plain Python number from an int, float, numpy scalar or 0-dim tensor."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return float(value)


def _json_value(value: int | float) -> int | float | str:
    """Strict JSON has no NaN/inf; they are written as the strings float() reads back."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _format_fields(
    metrics: dict[str, int | float], fields: list[tuple[str, str, Callable[[float], str]]]
) -> str:
    parts = []
    known = {key for key, _, _ in fields}
    for key, label, fmt in fields:
        if key in metrics:
            value = metrics[key]
            text = fmt(value) if math.isfinite(value) else str(value)
            parts.append(f" {label} {text} |")
    # Keys added later by the training loop still reach the console without an edit here.
    for key, value in metrics.items():
        if key not in known:
            parts.append(f" {key.replace('_', ' ')} {value:.6g} |")
    return "".join(parts)


class MetricsLogger:
    """Writes each train/eval record to every enabled backend.

    Args:
        log_dir: directory for `metrics.jsonl` (appended to, so a resumed run keeps its
            history); None disables the file.
        tensorboard_dir: directory for TensorBoard event files; None disables TensorBoard.
        use_wandb: log to Weights & Biases (works offline with WANDB_MODE=offline).
        wandb_project, wandb_group: passed to wandb.init.
        wandb_team, wandb_host, wandb_run_name: wandb.init's entity, server (base_url) and run
            name; None leaves wandb's own choice (the logged-in user, its host, a generated name).
        run_config: the run's configuration, stored with the wandb run and as TensorBoard text.
        enabled: False on every rank except the one that reports; a disabled logger opens
            nothing and prints nothing, but still returns the formatted lines.
        train_iters: total iterations, shown as "iteration N/total"; None shows "iteration N".
    """

    def __init__(
        self,
        log_dir: str | None,
        tensorboard_dir: str | None,
        use_wandb: bool,
        wandb_project: str | None,
        wandb_group: str | None,
        run_config: dict,
        enabled: bool,
        train_iters: int | None = None,
        wandb_team: str | None = None,
        wandb_host: str | None = None,
        wandb_run_name: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.train_iters = train_iters
        self.log_dir = log_dir
        self._jsonl = None
        self._writer = None
        self._wandb_run = None
        if not enabled:
            return
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            # Line-buffered append: each record reaches the OS as soon as it is written,
            # so a crash loses at most the record being written.
            self._jsonl = open(
                os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1, encoding="utf-8"
            )
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError(
                    "tensorboard_dir is set but TensorBoard is not importable: "
                    "`pip install tensorboard` or unset tensorboard_dir"
                ) from err
            self._writer = SummaryWriter(log_dir=tensorboard_dir)
            self._writer.add_text("config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```")
        if use_wandb:
            self._wandb_run = self._init_wandb(
                run_config, log_dir, project=wandb_project, group=wandb_group, entity=wandb_team,
                name=wandb_run_name, base_url=wandb_host)

    @staticmethod
    def _init_wandb(run_config: dict, log_dir: str | None, base_url: str | None, **names: str | None) -> Any:
        try:
            import wandb
        except ImportError as err:
            raise RuntimeError(
                "use_wandb is set but wandb is not installed: `pip install wandb`, "
                "or turn use_wandb off"
            ) from err
        try:
            settings = wandb.Settings(base_url=base_url) if base_url else None
            return wandb.init(config=run_config, dir=log_dir, settings=settings, **names)
        except Exception as err:  # wandb raises many types (auth, network, usage)
            raise RuntimeError(
                f"wandb.init failed ({type(err).__name__}: {err}). Log in with `wandb login`, "
                "or run without an account by setting WANDB_MODE=offline"
            ) from err

    def log_train(self, iteration: int, metrics: dict[str, Any]) -> str:
        """Record one training iteration's metrics; returns (and prints if enabled) the line."""
        values = {key: _to_number(value) for key, value in metrics.items()}
        if self.train_iters is None:
            head = f" iteration {iteration:8d} |"
        else:
            head = f" iteration {iteration:8d}/{self.train_iters:8d} |"
        line = head + _format_fields(values, _TRAIN_FIELDS)
        self._emit("train", iteration, values, line)
        return line

    def log_eval(self, iteration: int, metrics: dict[str, Any], split: str = "validation") -> str:
        """Record metrics of an evaluation on `split` ("validation": records of type "eval";
        "test": type "test"); adds lm_loss_ppl = exp(lm_loss) when it is missing."""
        values = {key: _to_number(value) for key, value in metrics.items()}
        if "lm_loss" in values and "lm_loss_ppl" not in values:
            loss = values["lm_loss"]
            values["lm_loss_ppl"] = math.exp(min(loss, _MAX_LOSS_FOR_PPL)) if math.isfinite(loss) else loss
        line = f" {split} loss at iteration {iteration:8d} |" + _format_fields(values, _EVAL_FIELDS)
        self._emit("eval" if split == "validation" else split, iteration, values, line)
        return line

    def log_tasks(self, iteration: int, metrics: dict[str, float]) -> str:
        """Record lm-evaluation-harness metrics ("piqa/acc", "lambada_openai/perplexity", ...) as
        a record of type "tasks"; TensorBoard and wandb get them as tasks/piqa/acc and so on."""
        values = {key: _to_number(value) for key, value in metrics.items()}
        line = f" eval tasks at iteration {iteration:8d} |" + "".join(
            f" {key} {value:.4g} |" for key, value in values.items())
        self._emit("tasks", iteration, values, line)
        return line

    def _emit(self, kind: str, iteration: int, values: dict[str, int | float], line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        if self._jsonl is not None:
            record: dict[str, Any] = {"type": kind, "iteration": iteration}
            record.update({key: _json_value(value) for key, value in values.items()})
            record["time"] = time.time()
            self._jsonl.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"{kind}/{key}", value, iteration)
            # SummaryWriter otherwise flushes every 120 s; logging is infrequent enough
            # that flushing per record is cheap and a live TensorBoard stays current.
            self._writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({f"{kind}/{key}": value for key, value in values.items()}, step=iteration)

    def close(self) -> None:
        """Flush and close every backend; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
