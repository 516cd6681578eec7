"""The README's first Quick start command, then its Evaluation command, end to end, in a copy of
the repository.

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


def readme_commands(section: str, count: int) -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split(f"## {section}\n", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [l.strip() for l in block.strip().splitlines()]
    assert len(lines) == count, lines
    return lines


def quickstart_commands() -> list[str]:
    return readme_commands("Quick start", 2)


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

    # README "Evaluation": the trained model on the first 500 documents of LAMBADA and PIQA.
    [evaluation] = readme_commands("Evaluation", 1)
    proc = subprocess.run(["bash", "-c", evaluation], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = (repo / "runs").glob("eval_eval_results_*.json")
    results = json.loads(path.read_text())["results"]
    piqa, lambada = results["piqa"], results["lambada_openai"]
    print(f"quick-start model: piqa acc {piqa['acc,none']:.3f}, lambada acc {lambada['acc,none']:.3f}, "
          f"perplexity {lambada['perplexity,none']:.4g}")
    # 500 documents: chance is 0.5 with a stderr of 0.022; a 150-step model is near it.
    assert 0.4 < piqa["acc,none"] < 0.6 and 0.4 < piqa["acc_norm,none"] < 0.6
    assert 0 <= lambada["acc,none"] < 0.05
    # The model has read Python code only: English last words are far from its guesses (measured
    # 2.3e10), but the perplexity is finite.
    assert 1e3 < lambada["perplexity,none"] < 1e14
    assert "|lambada_openai" in proc.stdout and "|piqa" in proc.stdout
