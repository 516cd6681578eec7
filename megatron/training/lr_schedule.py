"""Learning-rate schedule: linear warmup from 0, then cosine / linear / constant decay to min_lr.

The rate is a pure function of the step count and five schedule values (peak and floor rate,
warmup and decay lengths, style). All six are saved with the checkpoint (DeepSpeed stores
`state_dict`). On resume the step count always comes from the checkpoint; the schedule values
come from the source GPT-NeoX's keys name:
- `use_checkpoint_lr_scheduler: true`: the checkpoint's values, whatever this config says;
- `override_lr_scheduler: true`: this config's values, silently;
- neither: this config's values, and `changes` lists what differs from the checkpoint so the run
  can say so (GPT-NeoX stops on any difference instead, which would refuse the common "raise
  train_iters and continue", since lr_decay_iters defaults to train_iters).
"""

from __future__ import annotations

import math
from typing import Any

import torch

# The schedule's values, in the order they are reported; saved beside num_iters.
SCHEDULE_FIELDS = ("max_lr", "min_lr", "warmup_iters", "decay_iters", "style")


class AnnealingLR:
    def __init__(
        self, optimizer: torch.optim.Optimizer, max_lr: float, min_lr: float, warmup_iters: int,
        decay_iters: int, style: str, use_checkpoint_schedule: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_iters, self.decay_iters, self.style = warmup_iters, decay_iters, style
        self.use_checkpoint_schedule = use_checkpoint_schedule
        self.num_iters = 0
        # (field, checkpoint value, this run's value) for every schedule value that differed at load
        self.changes: list[tuple[str, Any, Any]] = []
        self._apply()

    def lr_at(self, it: int) -> float:
        if self.warmup_iters > 0 and it <= self.warmup_iters:
            return self.max_lr * it / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if it >= self.decay_iters:
            return self.min_lr
        frac = (it - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            coeff = 1.0 - frac
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def get_lr(self) -> float:
        return self.lr_at(self.num_iters)

    def get_last_lr(self) -> list[float]:
        return [self.get_lr()]

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr()

    def step(self, increment: int = 1) -> None:
        self.num_iters += increment
        self._apply()

    def state_dict(self) -> dict:
        return {"num_iters": self.num_iters, **{f: getattr(self, f) for f in SCHEDULE_FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        """Take the step count, and the schedule values as `use_checkpoint_schedule` says.
        Checkpoints of older versions (and GPT-NeoX's, under other names) hold only num_iters
        among these: nothing to compare, this config's values stay."""
        saved = {f: state[f] for f in SCHEDULE_FIELDS if f in state}
        self.changes = [(f, v, getattr(self, f)) for f, v in saved.items() if v != getattr(self, f)]
        if self.use_checkpoint_schedule:
            for f, v in saved.items():
                setattr(self, f, v)
        self.num_iters = state["num_iters"]
        self._apply()
