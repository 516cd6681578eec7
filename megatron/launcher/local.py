"""Running the ranks of one node as child processes of deepy.py, and watching them.

Each rank is started with its torch.distributed variables and its own session (a terminal's
Ctrl-C reaches deepy.py only, which passes it on, so the ranks can save first). When one rank
fails, its number and cause are printed and the others, which would otherwise wait in a
collective for the distributed timeout, are stopped: a dead rank never leaves a silent hang.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

# How long the other ranks get after one failed to exit by themselves (they usually fail with
# their own message: a config error, or the broken collective) before they are killed.
FAILURE_GRACE_SECONDS = 10.0


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        why = " (kill -9 or the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"exited with code {code}"


def _say(text: str) -> None:
    print(f"deepy.py: {text}", file=sys.stderr, flush=True)


class LocalRanks:
    """The ranks of this node: start, forward signals, wait, name the first that fails."""

    def __init__(self, command: list[str], nprocs: int, env: dict[str, str], master_port: int,
                 grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.procs: list[subprocess.Popen] = []
        for rank in range(nprocs):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                            MASTER_ADDR=env.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(master_port))
            self.procs.append(subprocess.Popen(command, env=rank_env, start_new_session=True))
        self.signalled_at: float | None = None

    def running(self) -> list[int]:
        return [rank for rank, p in enumerate(self.procs) if p.poll() is None]

    def forward(self, signum: int) -> None:
        """SIGTERM/SIGUSR1/SIGINT: every rank finishes its step and saves; Ctrl-C twice: stop now."""
        if signum == signal.SIGINT and self.signalled_at is not None:
            self.kill()
            return
        live = self.running()
        _say(f"{signal.Signals(signum).name} passed to {len(live)} rank(s); they save and stop after the "
             "current step")
        for rank in live:
            self.procs[rank].send_signal(signum)
        self.signalled_at = time.monotonic()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def wait(self) -> int:
        """0 when every rank exits 0; otherwise the first failure's code, after naming it."""
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:  # a rank killed by a signal is the cause; the others then fail on it
                return self._fail(*min(failed, key=lambda f: (f[1] > 0, f[0])))
            if all(code == 0 for code in codes):
                return 0
            if self.signalled_at is not None and time.monotonic() - self.signalled_at > self.grace_seconds:
                _say(f"rank(s) {_ranks(self.running())} still running {self.grace_seconds:g} s after the "
                     "signal (preemption_grace_seconds); killing them")
                self.kill()
                return 1
            time.sleep(0.2)

    def _fail(self, rank: int, code: int) -> int:
        live = self.running()
        stalled = f"; rank(s) {_ranks(live)} still running (hung, or about to fail too), stopping them" if live else ""
        _say(f"rank {rank} (pid {self.procs[rank].pid}) {describe_exit(code)}{stalled}")
        deadline = time.monotonic() + FAILURE_GRACE_SECONDS
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.kill()
        return code if code > 0 else 128 - code


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))
