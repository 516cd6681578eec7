"""A signal to the job: every rank finishes the step, saves, exits 0; the same command resumes
and the losses continue exactly as an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import ROOT, metrics
from megatron.training.preemption import Preemption


def test_second_ctrl_c_interrupts_at_once():
    import torch

    preemption = Preemption(torch.device("cpu"))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.received == "SIGINT" and preemption.agreed()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)


def start(cfg: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "deepy.py", "train.py", cfg], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_to_deepy_saves_exits_0_and_resumes_exactly(tiny, tmp_path):
    kw = dict(train_iters=30, eval_interval=100, checkpoint_factor=None, model_parallel_size=2, num_gpus=2)
    full = start(tiny("full", **kw, master_port=29071))
    assert full.wait(timeout=600) == 0, full.stdout.read()[-3000:]
    cfg = tiny("cut", **kw, load=str(tmp_path / "cut" / "ckpt"), master_port=29072)
    proc = start(cfg)
    log = tmp_path / "cut" / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to deepy.py alone, as `kill PID` does
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "deepy.py: SIGTERM passed to 2 rank(s)" in out
    stopped = int((tmp_path / "cut" / "ckpt" / "latest").read_text().removeprefix("global_step"))
    assert 2 <= stopped < 30 and f"stopping after iteration {stopped} on SIGTERM" in out
    assert not [p for p in psutil.process_iter(["cmdline"]) if cfg in " ".join(p.info["cmdline"] or [])]
    again = start(cfg)  # the same command resumes and finishes
    assert again.wait(timeout=600) == 0
    losses = [r["lm_loss"] for r in metrics(tmp_path / "cut" / "logs")]
    assert losses == [r["lm_loss"] for r in metrics(tmp_path / "full" / "logs")]
