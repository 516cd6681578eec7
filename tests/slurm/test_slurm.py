"""On a real Slurm (two slurmd nodes on this machine, tools/slurm/local_cluster.sh) and a real
mpirun: tools/slurm/train.sbatch trains like a local launch, a signalled job saves and requeues
itself and continues exactly, a kill -9 mid-checkpoint falls back to the previous checkpoint, a
dead rank ends the job naming it; mpirun-started ranks train like local ones."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, metrics

pytestmark = pytest.mark.slow
STATE = Path("/tmp") / f"neox_slurm_{os.getuid()}"
CLUSTER = ROOT / "tools" / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment for sbatch/scontrol; starts the cluster unless it runs (CI starts it)."""
    running = subprocess.run(["bash", str(CLUSTER), "status", str(STATE)], capture_output=True).returncode == 0
    if not running:
        proc = subprocess.run(["bash", str(CLUSTER), "start", str(STATE)], capture_output=True, text=True)
        if proc.returncode:
            pytest.fail(f"Slurm could not start here (tools/slurm/local_cluster.sh start):\n{proc.stderr[-3000:]}")
    env = dict(os.environ, SLURM_CONF=str(STATE / "slurm.conf"), PYTHONPATH=str(ROOT), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    yield env
    if not running:
        subprocess.run(["bash", str(CLUSTER), "stop", str(STATE)], capture_output=True)


def sbatch(env: dict[str, str], out: Path, *configs: str, wait: bool = False) -> tuple[int, str]:
    """Submit train.sbatch on 2 nodes x 2 tasks; (the job's exit code when waited for, else 0;
    job id). Waiting polls the job's state: `sbatch --wait` notices the end up to 30 s late."""
    cmd = ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "2", "-o", str(out)]
    proc = subprocess.run(cmd + ["tools/slurm/train.sbatch", *configs], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    job = proc.stdout.strip().split(";")[0]
    assert proc.returncode == 0 and job.isdigit(), proc.stderr
    if not wait:
        return 0, job
    wait_state(env, job, ENDED)
    return int(job_field(env, job, "ExitCode").split(":")[0]), job


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_field(env: dict[str, str], job: str, key: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    found = re.search(rf"\b{key}=(\S+)", text)
    return found.group(1) if found else ""


def wait_state(env: dict[str, str], job: str, states: tuple[str, ...], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(env, job, "JobState")
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} not in {states} after {timeout} s (state {state})")


def wait_lines(log: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and log.read_text().count("\n") >= n) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.exists(), f"{log} never appeared"


def run_local(cfg: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", cfg], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def losses(tmp_path: Path, name: str) -> list[float]:
    return [r["lm_loss"] for r in metrics(tmp_path / name / "logs")]


SLURM = dict(launcher="slurm", deepspeed_slurm=True)


@pytest.mark.parametrize("layout", [dict(model_parallel_size=2), dict(pipe_parallel_size=2)], ids=["tp2xdp2", "pp2xdp2"])
def test_sbatch_trains_like_a_local_launch(slurm, tiny, tmp_path, layout):
    kw = dict(layout, train_iters=8, eval_interval=100, checkpoint_factor=None)
    run_local(tiny("local", **kw, num_gpus=4))
    code, job = sbatch(slurm, tmp_path / "job.out", tiny("slurm", **kw, **SLURM), wait=True)
    out = (tmp_path / "job.out").read_text()
    assert code == 0, out[-3000:]
    assert "(2 node(s) x 2 task(s))" in out and "launching (slurm): srun --kill-on-bad-exit=1 --nodes=2 --ntasks=4" in out
    assert len(losses(tmp_path, "slurm")) == 8
    assert losses(tmp_path, "slurm") == losses(tmp_path, "local")


def test_time_limit_signal_saves_requeues_and_continues_exactly(slurm, tiny, tmp_path):
    """SIGUSR1 to the batch script (what --signal=B:USR1@300 sends before the time limit): the
    ranks save and exit 0, the script requeues the job, the second start resumes from `latest`
    and the losses of both starts are those of an uninterrupted run."""
    kw = dict(model_parallel_size=2, train_iters=120, eval_interval=1000, checkpoint_factor=None)
    run_local(tiny("full", **kw, num_gpus=4))
    cfg = tiny("cut", **kw, **SLURM, load=str(tmp_path / "cut" / "ckpt"))
    _, job = sbatch(slurm, tmp_path / "job.out", cfg)
    wait_lines(tmp_path / "cut" / "logs" / "metrics.jsonl", 3)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    deadline = time.monotonic() + 300
    while "requeueing" not in (tmp_path / "job.out").read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    stopped = int((tmp_path / "cut" / "ckpt" / "latest").read_text().removeprefix("global_step"))
    assert 3 <= stopped < 120
    wait_state(slurm, job, ("PENDING",), 120)  # requeued; starts again after the credential lifetime
    assert wait_state(slurm, job, ENDED) == "COMPLETED"
    out = (tmp_path / "job.out").read_text()
    assert "start 1 on" in out and "start 2 on" in out and job_field(slurm, job, "Restarts") == "1"
    assert f"stopping after iteration {stopped} on SIGUSR1" in out
    assert losses(tmp_path, "cut") == losses(tmp_path, "full")


def test_kill_9_mid_checkpoint_resumes_from_the_previous_one(slurm, tiny, tmp_path):
    kw = dict(model_parallel_size=2, train_iters=6, eval_interval=1000, checkpoint_factor=2)
    cfg = tiny("run", **kw, **SLURM, load=str(tmp_path / "run" / "ckpt"))
    marker = tmp_path / "stalled"
    stall = dict(slurm, PYTHONPATH=f"{ROOT / 'tests' / 'slurm' / 'stall_save'}:{ROOT}",
                 NEOX_STALL_SAVE_TAG="global_step4", NEOX_STALL_SAVE_MARKER=str(marker))
    _, job = sbatch(stall, tmp_path / "first.out", cfg)
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), (tmp_path / "first.out").read_text()[-3000:]
    subprocess.run(["scancel", "--full", "--signal=KILL", job], env=slurm, check=True)
    wait_state(slurm, job, ENDED, 120)
    ckpt = tmp_path / "run" / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step2" and (ckpt / "global_step4").is_dir()
    code, _ = sbatch(slurm, tmp_path / "second.out", cfg, wait=True)
    out = (tmp_path / "second.out").read_text()
    assert code == 0, out[-3000:]
    assert (f"WARNING: global_step4 in {ckpt} was never completed (the job stopped while writing it); resuming "
            "from the last complete checkpoint, global_step2") in out
    iterations = [r["iteration"] for r in metrics(tmp_path / "run" / "logs")]
    assert iterations[-4:] == [3, 4, 5, 6] and (ckpt / "latest").read_text() == "global_step6"


def test_a_killed_rank_ends_the_job_naming_it(slurm, tiny, tmp_path):
    kw = dict(model_parallel_size=2, train_iters=3000, eval_interval=10000, checkpoint_factor=None,
              distributed_timeout_minutes=0.5)
    _, job = sbatch(slurm, tmp_path / "job.out", tiny("run", **kw, **SLURM))
    wait_lines(tmp_path / "run" / "logs" / "metrics.jsonl", 2)
    rank1 = [p for p in psutil.process_iter(["cmdline"]) if "train.py" in " ".join(p.info["cmdline"] or [])
             and str(tmp_path) in " ".join(p.info["cmdline"] or []) and p.environ().get("SLURM_PROCID") == "1"]
    assert len(rank1) == 1
    killed = time.monotonic()
    rank1[0].send_signal(signal.SIGKILL)
    assert wait_state(slurm, job, ENDED, 120) == "FAILED"
    assert time.monotonic() - killed < 60
    out = (tmp_path / "job.out").read_text()
    assert re.search(r"srun: error: node\d: task 1: Killed", out), out[-3000:]
    assert job_field(slurm, job, "ExitCode") != "0:0"
    assert "deepy.py: srun exited with code" in out


def test_mpirun_ranks_train_like_local_ones(tiny, tmp_path):
    """mpirun started by hand, and by deepy.py for `launcher: openmpi`: the ranks read
    OMPI_COMM_WORLD_* and train to the losses of a local launch."""
    kw = dict(model_parallel_size=2, train_iters=8, eval_interval=100, checkpoint_factor=None)
    run_local(tiny("local", **kw, num_gpus=2))
    cfg = tiny("mpi", **kw, launcher="openmpi", deepspeed_mpi=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "train.py",
                           cfg], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert losses(tmp_path, "mpi") == losses(tmp_path, "local")
    out = run_local(tiny("deepy_mpi", **kw, launcher="openmpi", num_gpus=2))
    assert "launching (openmpi): mpirun -np 2 --map-by ppr:2:node" in out
    assert losses(tmp_path, "deepy_mpi") == losses(tmp_path, "local")
