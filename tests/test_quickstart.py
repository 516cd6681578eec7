"""The README's first Quick start command, end to end, in a copy of the repository.

The install step (`bash tools/install.sh`) is left out here: CI runs it before the tests, and
re-running it from a temporary copy would re-point the editable install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import ROOT


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [l.strip() for l in block.strip().splitlines()]
    assert len(lines) == 2, lines
    return lines


@pytest.mark.slow
def test_readme_default_run(tmp_path):
    first = quickstart_commands()[0]
    prefix = "bash tools/install.sh && "
    assert first.startswith(prefix)
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "-c", first[len(prefix):]], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(l) for l in (repo / "runs/cpu_stdlib/logs/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert train[-1]["iteration"] == 150
    # README: the loss (mean of each 10 steps) "falls from about 8 to under 5"; measured 7.92 at
    # step 10 and 4.56 at step 150 (steps 130-150 logged 4.40-4.72).
    assert 7.5 < train[0]["lm_loss"] < 8.5 and train[-1]["lm_loss"] < 5
    assert evals[-1]["lm_loss"] < evals[0]["lm_loss"]
    ckpt = repo / "runs/cpu_stdlib/checkpoints"
    assert (ckpt / "latest").read_text() == "global_step150"
    assert list((repo / "runs/cpu_stdlib/tensorboard").glob("events.out.tfevents.*"))
    for label in ("metrics", "tensorboard", "checkpoints"):
        assert label in proc.stdout
    assert str(ckpt) in proc.stdout
