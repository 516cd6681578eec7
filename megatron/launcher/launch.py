"""Starting the workers through DeepSpeed's launcher.

One node: `deepspeed.launcher.runner --num_gpus N` with no hostfile (a hostfile makes DeepSpeed
demand ssh even for localhost). Several nodes: the hostfile and the configured multi-node launcher.
On a CPU-only machine N is num_gpus or TP x PP, and each rank gets cores // N OpenMP threads
(DeepSpeed's launcher sets none, and oversubscribed ranks run several times slower).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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


def launch(cfg: NeoXConfig, script: str, config_files: list[str]) -> int:
    cmd = launch_command(cfg, script, config_files)
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=worker_env(cfg))
