"""Stopping cleanly when the job is asked to: a checkpoint, then exit 0.

SIGTERM (Slurm's preemption and time limit, `kill`), SIGUSR1 (`sbatch --signal=USR1@300`,
`scancel --signal=USR1`) and SIGINT (Ctrl-C) only set a flag; the step under way finishes.
After each step every rank learns whether any rank was signalled (one all-reduce of a single
number), so all of them stop after the same step, save it, and exit 0; the next start resumes
from it. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    def __init__(self, device: torch.device) -> None:
        self.device = device  # NCCL reduces GPU tensors only
        self.received: str | None = None
        if threading.current_thread() is threading.main_thread():  # handlers live on the main thread
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # pressed twice: do not wait for the checkpoint
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank has been signalled (a collective: call on all ranks)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
