"""Learning-rate schedule: linear warmup from 0, then cosine / linear / constant decay to min_lr.

The rate is a pure function of the step count, and the step count is the only state, so a
resumed run continues the schedule exactly (DeepSpeed saves `state_dict` with the checkpoint).
"""

from __future__ import annotations

import math

import torch


class AnnealingLR:
    def __init__(
        self, optimizer: torch.optim.Optimizer, max_lr: float, min_lr: float, warmup_iters: int,
        decay_iters: int, style: str,
    ) -> None:
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_iters, self.decay_iters, self.style = warmup_iters, decay_iters, style
        self.num_iters = 0
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
        return {"num_iters": self.num_iters}

    def load_state_dict(self, state: dict) -> None:
        self.num_iters = state["num_iters"]
        self._apply()
