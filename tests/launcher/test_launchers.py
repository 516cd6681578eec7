"""Launching under Slurm, MPI and DeepSpeed's runner without the cluster: the rank variables a task
derives, the command each node runs, what is forwarded; and a rank that dies or hangs on one node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, run_cli
from megatron.config import load_config
from megatron.launcher.environment import expand_hostlist, rank_environment, world_size
from megatron.launcher.launch import plan_launch

SLURM_TASK = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242",
              "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_slurm_host_lists_expand():
    assert expand_hostlist("gpu[07-09,12],login1") == ["gpu07", "gpu08", "gpu09", "gpu12", "login1"]
    assert expand_hostlist("node1") == ["node1"]
    assert expand_hostlist("a[1-2],b[010-011]") == ["a1", "a2", "b010", "b011"]


def test_slurm_task_variables():
    assert rank_environment(SLURM_TASK) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                            "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242)}
    assert rank_environment(SLURM_TASK, master_port=6000)["MASTER_PORT"] == "6000"
    given = dict(SLURM_TASK, MASTER_ADDR="10.0.0.1", MASTER_PORT="7000")  # deepy.py's, exported by srun
    assert rank_environment(given) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    assert rank_environment(dict(SLURM_TASK, RANK="0", WORLD_SIZE="1")) == {}  # a launcher already set them
    assert world_size(SLURM_TASK) == 4 and world_size({}) == 1


def test_mpi_task_variables():
    one_node = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert rank_environment(one_node) == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
                                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    mv2 = {"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_LOCAL_RANK": "1", "MV2_COMM_WORLD_SIZE": "8",
           "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    assert rank_environment(mv2) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    with pytest.raises(RuntimeError, match="^openmpi started this task on several nodes but MASTER_ADDR is not set"):
        rank_environment(dict(one_node, OMPI_COMM_WORLD_SIZE="4"))


def _dry_run(env: dict[str, str], *configs: str) -> list[str]:
    proc = subprocess.run([sys.executable, "deepy.py", "--dry-run", "train.py", *configs], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("commands (", 1)[1].splitlines()


def test_dry_run_inside_a_slurm_allocation(tiny):
    """The allocation (sbatch --nodes 2 --ntasks-per-node 2) decides the layout, not num_gpus."""
    cfg = tiny(launcher="slurm", deepspeed_slurm=True, num_gpus=8, account="proj1")
    alloc = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2(x2)",
             "SLURM_JOB_NODELIST": "node[1-2]"}
    py = sys.executable
    assert _dry_run(alloc, cfg) == [
        "slurm launcher):",
        f"  this machine: srun --kill-on-bad-exit=1 --nodes=2 --ntasks=4 --ntasks-per-node=2 --account=proj1 "
        f"--export=ALL {py} -u train.py {cfg}",
        f"  node1, ranks 0-1: RANK=SLURM_PROCID MASTER_ADDR=node1 MASTER_PORT=20077 {py} -u train.py {cfg}",
        f"  node2, ranks 2-3: RANK=SLURM_PROCID MASTER_ADDR=node1 MASTER_PORT=20077 {py} -u train.py {cfg}",
    ]


def test_dry_run_with_a_hostfile_pdsh_and_openmpi(tiny, tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("nodeA slots=4\nnodeB slots=4\nnodeC slots=4\n")
    py = sys.executable
    pdsh = tiny(num_nodes=2, num_gpus=4, hostfile=str(hosts), exclude="nodeB")
    lines = _dry_run({}, "-d", str(tmp_path), Path(pdsh).name)  # GPT-NeoX's -d CONFIG_DIR
    assert lines[0] == "pdsh launcher):"
    assert lines[1].startswith(f"  this machine: {py} -m deepspeed.launcher.runner --hostfile {hosts} --launcher "
                               "pdsh --num_nodes 2 --num_gpus 4 --master_addr nodeA --master_port 29500 "
                               "--exclude nodeB train.py")
    assert [line.split(" (node_rank")[0] for line in lines[2:]] == ["  nodeA", "  nodeC"]
    assert "--node_rank=1 --master_addr=nodeA --master_port=29500 train.py" in lines[3]

    mpi = tiny(launcher="openmpi", deepspeed_mpi=True, num_nodes=2, num_gpus=2, hostfile=str(hosts),
               forward_env=["MY_*"])
    env = {"NCCL_DEBUG": "INFO", "WANDB_MODE": "offline", "MY_SETTING": "1", "UNRELATED_VAR": "x"}
    lines = _dry_run(env, mpi)
    cmd = lines[1].split()
    exported = {cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-x"}
    assert {"NCCL_DEBUG", "WANDB_MODE", "MY_SETTING", "PYTHONPATH", "MASTER_ADDR", "MASTER_PORT"} <= exported
    assert "UNRELATED_VAR" not in exported
    assert cmd[2:8] == ["mpirun", "-np", "4", "--map-by", "ppr:2:node", "--oversubscribe"]
    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "nodeA:2,nodeB:2"
    assert lines[2:] == [f"  nodeA, ranks 0-1: {py} -u train.py {mpi}", f"  nodeB, ranks 2-3: {py} -u train.py {mpi}"]


def test_multi_node_without_hostfile_still_plans(tiny):
    proc = run_cli("deepy.py", "--dry-run", "train.py", tiny(num_nodes=2, num_gpus=2))
    assert proc.returncode == 0
    assert proc.stdout.rstrip().endswith(
        "commands (pdsh launcher): not launchable as configured: num_nodes 2 with launcher pdsh needs a "
        "hostfile listing the nodes (or launcher: slurm, which needs none)")


def test_local_plan_forwards_the_environment(tiny):
    plan = plan_launch(load_config([tiny(num_gpus=2)], require_files=False), "train.py", ["a.yml"],
                       environ={"NCCL_DEBUG": "INFO", "PATH": "/bin"})
    assert plan.local_ranks == 2 and plan.command == [sys.executable, "-u", "train.py", "a.yml"]
    assert plan.env["NCCL_DEBUG"] == "INFO" and plan.env["PYTHONUNBUFFERED"] == "1"


def _start(cfg: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "deepy.py", "train.py", cfg], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank(proc: subprocess.Popen, rank: int, log: Path) -> psutil.Process:
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(c.cmdline())]
    return next(c for c in ranks if c.environ().get("RANK") == str(rank))


@pytest.mark.slow
def test_a_dead_or_hung_rank_ends_the_job_naming_it(tiny, tmp_path):
    """kill -9 of rank 1: the job ends at once with 137 and the rank named. SIGSTOP of rank 1 (a
    hang): rank 0's collective times out after distributed_timeout_minutes (15 s here) and the job
    ends non-zero naming rank 1 as the one still running."""
    kw = dict(train_iters=2000, eval_interval=10000, checkpoint_factor=None, num_gpus=2,
              distributed_timeout_minutes=0.25)
    proc = _start(tiny("dead", **kw))
    victim = _rank(proc, 1, tmp_path / "dead" / "logs" / "metrics.jsonl")
    victim.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 137, out[-3000:]
    assert f"deepy.py: rank 1 (pid {victim.pid}) was killed by SIGKILL (kill -9 or the out-of-memory killer)" in out
    assert "error: rank 0 lost another rank in a collective" in out
    assert "Traceback" not in out

    proc = _start(tiny("hung", **kw))
    victim = _rank(proc, 1, tmp_path / "hung" / "logs" / "metrics.jsonl")
    victim.send_signal(signal.SIGSTOP)
    start = time.monotonic()
    try:
        out = proc.communicate(timeout=150)[0]
    finally:
        if victim.is_running():
            victim.kill()
    assert proc.returncode == 1, out[-3000:]
    assert 15 <= time.monotonic() - start < 60
    assert "Timed out waiting 15000ms" in out
    assert "; rank(s) 1 still running (hung, or about to fail too), stopping them" in out
