"""Starting the ranks: one node directly, Slurm with srun, MPI with mpirun, pdsh through DeepSpeed.

    local    one node: deepy.py starts num_gpus (or TP x PP on a CPU) processes itself (local.py)
    slurm    srun inside (or creating) an allocation; tasks read SLURM_* (environment.py); no ssh
    openmpi  mpirun; tasks read OMPI_COMM_WORLD_*; no mpi4py
    pdsh, mvapich  DeepSpeed's multi-node runner with the hostfile (ssh for pdsh)

`plan_launch` decides the command once; `--dry-run` prints it per node and `launch` runs it.
On a CPU-only machine each rank gets cores // ranks-per-node OpenMP threads (no launcher sets
any, and oversubscribed ranks run several times slower).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from megatron.config import NeoXConfig
from megatron.launcher.environment import (DEFAULT_PORT, expand_hostlist, forwarded_names, rank_environment,
                                          slurm_allocation)
from megatron.launcher.local import LocalRanks, describe_exit
from megatron.parallel.device import device_type


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice), for a rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LaunchPlan:
    command: list[str]  # what deepy.py runs here: one rank's command (local) or the launcher's
    env: dict[str, str]
    nodes: list[str] = field(default_factory=list)  # one line per node, what runs there
    local_ranks: int = 0  # local: how many ranks deepy.py starts itself
    master_port: int = 0
    deepspeed_env: list[str] = field(default_factory=list)  # names DeepSpeed's runner must export


def _worker_env(cfg: NeoXConfig, environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    per_node = cfg.derived.procs_per_node
    if device_type() == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_node))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def plan_launch(cfg: NeoXConfig, script: str, config_files: list[str],
                environ: Mapping[str, str] = os.environ) -> LaunchPlan:
    env = _worker_env(cfg, environ)
    worker = [sys.executable, "-u", script, *config_files]
    planner = {"local": _local, "slurm": _slurm, "openmpi": _openmpi}.get(cfg.derived.launcher, _deepspeed)
    return planner(cfg, worker, env)


def _local(cfg: NeoXConfig, worker: list[str], env: dict[str, str]) -> LaunchPlan:
    n, port = cfg.derived.world_size, _master(cfg, [])[1]
    line = f"this machine, ranks 0-{n - 1}: RANK=<r> LOCAL_RANK=<r> WORLD_SIZE={n} MASTER_ADDR=127.0.0.1 " \
           f"MASTER_PORT={port} {shlex.join(worker)}"
    return LaunchPlan(worker, env, [line], local_ranks=n, master_port=port)


def _slurm(cfg: NeoXConfig, worker: list[str], env: dict[str, str]) -> LaunchPlan:
    """srun starts every task; each takes its rank from SLURM_PROCID, the rendezvous host from the
    node list and the port from the job id (or master_addr/master_port when set)."""
    lc, d = cfg.launcher, cfg.derived
    per_node = d.procs_per_node
    cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={d.num_nodes}", f"--ntasks={d.world_size}",
           f"--ntasks-per-node={per_node}"]
    if lc.include:
        cmd.append("--nodelist=" + lc.include.replace("@", ","))
    if lc.exclude:
        cmd.append("--exclude=" + lc.exclude.replace("@", ","))
    cmd += [f"--comment={lc.comment}"] * bool(lc.comment) + [f"--account={lc.account}"] * bool(lc.account)
    for key, value in (("MASTER_ADDR", lc.master_addr), ("MASTER_PORT", lc.master_port)):
        if value:
            env[key] = str(value)
    # srun exports the whole environment by default; naming it keeps a site's SLURM_EXPORT_ENV=NONE
    # from dropping what every rank needs.
    cmd.append("--export=ALL")
    cmd += worker
    hosts = expand_hostlist(env["SLURM_JOB_NODELIST"]) if slurm_allocation(env) else []
    ranks = rank_environment(dict(env, SLURM_PROCID="0", SLURM_NTASKS=str(d.world_size)), lc.master_port) \
        if hosts else {}
    where = (f"RANK=SLURM_PROCID MASTER_ADDR={env.get('MASTER_ADDR') or ranks['MASTER_ADDR']} "
             f"MASTER_PORT={env.get('MASTER_PORT') or ranks['MASTER_PORT']}" if hosts else
             "RANK=SLURM_PROCID, MASTER_ADDR the first host, MASTER_PORT from the job id")
    nodes = [f"{host}, ranks {i * per_node}-{(i + 1) * per_node - 1}: {where} {shlex.join(worker)}"
             for i, host in enumerate(hosts[:d.num_nodes])] or [
        f"each of {d.num_nodes} node(s), {per_node} task(s) ({where}): {shlex.join(worker)}"]
    return LaunchPlan(cmd, env, [f"this machine: {shlex.join(cmd)}"] + nodes)


def _hosts(cfg: NeoXConfig) -> list[str]:
    if not cfg.launcher.hostfile:
        return []
    from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion

    pool = fetch_hostfile(cfg.launcher.hostfile) or {}
    return list(parse_inclusion_exclusion(pool, cfg.launcher.include or "", cfg.launcher.exclude or ""))


def _master(cfg: NeoXConfig, hosts: list[str]) -> tuple[str, int]:
    lc = cfg.launcher
    if cfg.derived.num_nodes == 1:
        return lc.master_addr or "127.0.0.1", lc.master_port or free_port()
    return lc.master_addr or (hosts[0] if hosts else "127.0.0.1"), lc.master_port or DEFAULT_PORT


def _openmpi(cfg: NeoXConfig, worker: list[str], env: dict[str, str]) -> LaunchPlan:
    """mpirun starts every rank; -x hands each the variables that must reach it."""
    d, hosts = cfg.derived, _hosts(cfg)
    per_node = d.procs_per_node
    addr, port = _master(cfg, hosts)
    env.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    cmd = ["mpirun", "-np", str(d.world_size), "--map-by", f"ppr:{per_node}:node", "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")  # containers run as root
    if hosts:
        cmd += ["--host", ",".join(f"{h}:{per_node}" for h in hosts[:d.num_nodes])]
    for name in forwarded_names(env, tuple(cfg.launcher.forward_env)):
        cmd += ["-x", name]
    cmd += worker
    where = hosts[:d.num_nodes] or ["this machine"]
    nodes = [f"{h}, ranks {i * per_node}-{(i + 1) * per_node - 1}: {shlex.join(worker)}" for i, h in enumerate(where)]
    return LaunchPlan(cmd, env, [f"this machine: {shlex.join(cmd)}"] + nodes)


def _deepspeed(cfg: NeoXConfig, worker: list[str], env: dict[str, str]) -> LaunchPlan:
    """pdsh (ssh) or MVAPICH through DeepSpeed's runner, which starts deepspeed.launcher.launch on
    every host of the hostfile; DS_ENV_FILE carries the variables every rank needs."""
    d, lc, hosts = cfg.derived, cfg.launcher, _hosts(cfg)
    per_node = d.procs_per_node
    addr, port = _master(cfg, hosts)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(lc.hostfile), "--launcher",
           d.launcher, "--num_nodes", str(d.num_nodes), "--num_gpus", str(per_node), "--master_addr", addr,
           "--master_port", str(port)]
    cmd += ["--include", lc.include] * bool(lc.include) + ["--exclude", lc.exclude] * bool(lc.exclude)
    cmd += ["--no_ssh_check"] * lc.no_ssh_check + worker[2:]
    from deepspeed.launcher.runner import encode_world_info

    world_info = encode_world_info({h: list(range(per_node)) for h in hosts[:d.num_nodes]})
    nodes = [f"{h} (node_rank {i}): {sys.executable} -u -m deepspeed.launcher.launch --world_info={world_info} "
             f"--node_rank={i} --master_addr={addr} --master_port={port} {shlex.join(worker[2:])}"
             for i, h in enumerate(hosts[:d.num_nodes])]
    return LaunchPlan(cmd, env, [f"this machine: {shlex.join(cmd)}"] + nodes,
                      deepspeed_env=forwarded_names(env, tuple(lc.forward_env)))


def launch(cfg: NeoXConfig, script: str, config_files: list[str]) -> int:
    """Run the plan and wait. A SIGTERM, SIGUSR1 or SIGINT to deepy.py reaches every rank, which
    finishes its step, saves and exits 0 (megatron/training/preemption.py); srun and mpirun pass
    signals on to their tasks themselves. Ranks still alive `preemption_grace_seconds` after the
    signal are killed."""
    plan = plan_launch(cfg, script, config_files)
    print(f"launching ({cfg.derived.launcher}): " + " ".join(plan.command), flush=True)
    grace = cfg.launcher.preemption_grace_seconds
    if plan.local_ranks:
        ranks = LocalRanks(plan.command, plan.local_ranks, plan.env, plan.master_port, grace)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: ranks.forward(signum))
        return ranks.wait()
    return _run_launcher(plan, grace)


def _run_launcher(plan: LaunchPlan, grace: float) -> int:
    if not plan.deepspeed_env:
        return _wait_launcher(plan, grace)
    with tempfile.NamedTemporaryFile("w", prefix="neox_env_", suffix=".env") as env_file:
        env_file.writelines(f"{k}={plan.env[k]}\n" for k in plan.deepspeed_env)
        env_file.flush()
        plan.env["DS_ENV_FILE"] = env_file.name
        return _wait_launcher(plan, grace)


def _wait_launcher(plan: LaunchPlan, grace: float) -> int:
    try:
        launcher = subprocess.Popen(plan.command, env=plan.env, start_new_session=True)
    except FileNotFoundError:
        print(f"deepy.py: {plan.command[0]} not found: this launcher needs it on PATH", file=sys.stderr)
        return 2
    deadline: list[float] = []

    def forward(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and deadline:
            os.killpg(launcher.pid, signal.SIGKILL)
            return
        print(f"deepy.py: {signal.Signals(signum).name} passed to {plan.command[0]}; the ranks save and stop "
              "after the current step", file=sys.stderr, flush=True)
        launcher.send_signal(signum)
        deadline.append(time.monotonic() + grace)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        try:
            code = launcher.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if deadline and time.monotonic() > deadline[0]:
                print(f"deepy.py: ranks still running {grace:g} s after the signal; killing them",
                      file=sys.stderr, flush=True)
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
                return 1
            continue
        if code:
            print(f"deepy.py: {plan.command[0]} {describe_exit(code)}", file=sys.stderr, flush=True)
        return code if code >= 0 else 128 - code
