"""Starting the workers through DeepSpeed's launcher.

One node: `deepspeed.launcher.runner --num_gpus N` with no hostfile (a hostfile makes DeepSpeed
demand ssh even for localhost). Several nodes: the hostfile and the configured multi-node launcher.
On a CPU-only machine N is num_gpus or TP x PP, and each rank gets cores // N OpenMP threads
(DeepSpeed's launcher sets none, and oversubscribed ranks run several times slower).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from megatron.config import NeoXConfig
from megatron.parallel.device import device_type


MULTI_NODE_PORT = 29500  # every node must agree on it without talking first


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice), for a rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg: NeoXConfig, script: str, config_files: list[str]) -> list[str]:
    per_node = cfg.derived.world_size // cfg.launcher.num_nodes
    port = cfg.launcher.master_port or (free_port() if cfg.launcher.num_nodes == 1 else MULTI_NODE_PORT)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
    if cfg.launcher.num_nodes > 1:
        cmd += ["--hostfile", str(cfg.launcher.hostfile), "--num_nodes", str(cfg.launcher.num_nodes),
                "--num_gpus", str(per_node), "--launcher", cfg.launcher.launcher]
    else:
        cmd += ["--num_gpus", str(per_node)]
    return cmd + [script, *config_files]


def worker_env(cfg: NeoXConfig) -> dict[str, str]:
    env = dict(os.environ)
    if device_type() == "cpu" and "OMP_NUM_THREADS" not in env:
        per_node = cfg.derived.world_size // cfg.launcher.num_nodes
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_node))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The worker processes under DeepSpeed's launcher on this node (they carry --local_rank)."""
    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if any(arg.startswith("--local_rank") for arg in child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def launch(cfg: NeoXConfig, script: str, config_files: list[str]) -> int:
    """Run the launcher and wait for it. A SIGTERM, SIGUSR1 or SIGINT to deepy.py goes to the
    workers themselves, which finish the step, save and exit 0 (megatron/training/preemption.py).
    The launcher runs in its own session so that a terminal's Ctrl-C reaches it only this way:
    DeepSpeed's launcher would otherwise kill the workers on SIGINT/SIGTERM before they saved.
    Workers still alive `preemption_grace_seconds` after the signal are killed."""
    cmd = launch_command(cfg, script, config_files)
    print("launching: " + " ".join(cmd), flush=True)
    launcher = subprocess.Popen(cmd, env=worker_env(cfg), start_new_session=True)
    deadline: list[float] = []

    def forward(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and deadline:  # Ctrl-C twice: stop now
            os.killpg(launcher.pid, signal.SIGKILL)
            return
        workers = _workers(launcher)
        print(f"deepy.py: {signal.Signals(signum).name} passed to {len(workers)} worker(s); they save and stop "
              f"after the current step", flush=True)
        for worker in workers:
            worker.send_signal(signum)
        deadline.append(time.monotonic() + cfg.launcher.preemption_grace_seconds)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        try:
            return launcher.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if deadline and time.monotonic() > deadline[0]:
                print(f"deepy.py: workers still running {cfg.launcher.preemption_grace_seconds} s after the "
                      "signal; killing them", file=sys.stderr, flush=True)
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
                return 1
