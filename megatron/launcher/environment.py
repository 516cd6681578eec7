"""What a worker learns from the scheduler that started it, and what reaches every rank.

torch.distributed wants RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The local
launcher and DeepSpeed's set them; `srun` and `mpirun` set their own variables instead, so a task
they start translates them here (no ssh, no hostfile, no mpi4py):

    Slurm      SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; MASTER_ADDR = first host of SLURM_JOB_NODELIST
    Open MPI   OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_SIZE
    MVAPICH    MV2_COMM_WORLD_RANK, MV2_COMM_WORLD_LOCAL_RANK, MV2_COMM_WORLD_SIZE

Variables already set win (deepy.py sets MASTER_ADDR/MASTER_PORT for the tasks it starts).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping

from megatron.config.config import effective_launcher, pipe_stages
from megatron.config.loader import merge_files, split_into_groups
from megatron.parallel.device import gpus_on_this_node

# Prefixes forwarded to every rank by the multi-node launchers (srun exports everything anyway).
FORWARDED_PREFIXES = ("NCCL_", "WANDB_", "PYTHON", "CUDA_", "OMP_", "MASTER_", "HF_", "TORCH_", "NEOX_",
                      "UCX_", "FI_", "MV2_")

_SCHEDULERS = (
    ("slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE"),
)
DEFAULT_PORT = 29500


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, e.g. 'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def scheduler(environ: Mapping[str, str] = os.environ) -> str | None:
    """'slurm', 'openmpi' or 'mvapich' when this process is a task that scheduler started."""
    for name, rank, _, _ in _SCHEDULERS:
        if rank in environ:
            return name
    return None


def slurm_allocation(environ: Mapping[str, str] = os.environ) -> tuple[int, int | None] | None:
    """(nodes, tasks per node) of the Slurm allocation this process runs in; tasks per node is
    None when the job did not ask for a task count."""
    nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    if not environ.get("SLURM_JOB_ID") or not nodes:
        return None
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # '4' or '4(x2)'
    if per_node.isdigit():
        return int(nodes), int(per_node)
    tasks = environ.get("SLURM_NTASKS")
    return int(nodes), int(tasks) // int(nodes) if tasks else None


def job_port(environ: Mapping[str, str]) -> int:
    """A port every task of a Slurm job agrees on without talking: from the job id, so two jobs
    sharing a node do not collide on 29500."""
    job = environ.get("SLURM_JOB_ID")
    return 20000 + int(job) % 20000 if job and job.isdigit() else DEFAULT_PORT


def rank_environment(environ: Mapping[str, str] = os.environ, master_port: int | None = None) -> dict[str, str]:
    """The torch.distributed variables for this task, from whichever scheduler started it.

    Empty when RANK is already set (a launcher of ours or DeepSpeed's did it) or no scheduler
    did. master_port: the config's, used unless MASTER_PORT is already in the environment."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {}
    for name, rank, local, size in _SCHEDULERS:
        if rank in environ:
            break
    else:
        return {}
    env = {"RANK": environ[rank], "LOCAL_RANK": environ.get(local, "0"), "WORLD_SIZE": environ[size]}
    if "MASTER_ADDR" not in environ:
        env["MASTER_ADDR"] = _master_addr(name, environ)
    if "MASTER_PORT" not in environ:
        env["MASTER_PORT"] = str(master_port or job_port(environ))
    return env


def _master_addr(name: str, environ: Mapping[str, str]) -> str:
    if name == "slurm":
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if nodelist:
            return expand_hostlist(nodelist)[0]
    local_size = environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or environ.get("MV2_COMM_WORLD_LOCAL_SIZE")
    world = environ.get("OMPI_COMM_WORLD_SIZE") or environ.get("MV2_COMM_WORLD_SIZE")
    if local_size is not None and local_size == world:
        return "127.0.0.1"  # every rank on this node
    raise RuntimeError(
        f"{name} started this task on several nodes but MASTER_ADDR is not set: start the job with "
        "deepy.py (it sets it), or export MASTER_ADDR=<first host> to every rank "
        "(mpirun -x MASTER_ADDR=...)")


def world_size(environ: Mapping[str, str] = os.environ) -> int:
    """The number of ranks of this run as the launcher or scheduler says; 1 when run alone."""
    for _, _, _, size in (("", "", "", "WORLD_SIZE"),) + _SCHEDULERS:
        if size in environ:
            return int(environ[size])
    return 1


def adopt_scheduler_environment(master_port: int | None = None) -> None:
    """Put the scheduler's rank variables into os.environ for torch.distributed and DeepSpeed."""
    os.environ.update(rank_environment(os.environ, master_port))


def forwarded_names(environ: Mapping[str, str], extra: tuple[str, ...] = ()) -> list[str]:
    """Names of the variables that must reach every rank: the common prefixes and the user's list
    (`forward_env`, shell patterns allowed), those set here."""
    names = [k for k in environ if k.startswith(FORWARDED_PREFIXES)]
    for pattern in extra:
        names += [k for k in fnmatch.filter(environ, pattern) if k not in names]
    return sorted(names)


def node_layout(paths: list[str], environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(nodes, processes per node) deepy.py starts for these config files: the one place that looks
    at the machine, so load_config never does. Inside a Slurm allocation the allocation decides
    (sbatch --nodes/--ntasks-per-node override the config); otherwise num_nodes, and per node
    num_gpus, else one per GPU of this machine (GPT-NeoX's default), else (CPU only) TP x PP."""
    values, origin, _ = merge_files(paths)
    groups = split_into_groups(values, origin)
    parallel, launcher = groups["parallel"], groups["launcher"]
    per_node = (launcher.num_gpus or gpus_on_this_node()
                or parallel.model_parallel_size * pipe_stages(parallel))
    allocation = slurm_allocation(environ) if effective_launcher(launcher) == "slurm" else None
    if allocation is not None:
        return allocation[0], allocation[1] or per_node
    return launcher.num_nodes, per_node
