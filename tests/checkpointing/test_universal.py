"""Resuming at another data-parallel size carries Adam's moments, step, scheduler and RNG
(DeepSpeed's universal checkpoint, megatron/checkpointing/universal.py): the resumed steps give the
losses and gradient norms of an uninterrupted run, which a fresh optimizer does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import metrics, run_cli, tiny_config
from megatron.checkpointing.reader import CheckpointReader

# Global batch 8 at every size: micro 2 x accumulation 4 at DP1, micro 2 x accumulation 2 at DP2.
COMMON = dict(train_micro_batch_size_per_gpu=2, train_iters=4, eval_interval=100, checkpoint_factor=None,
              zero_optimization={"stage": 1})
DP1 = dict(gradient_accumulation_steps=4)
DP2 = dict(gradient_accumulation_steps=2)
UNIVERSAL = "weights, optimizer, scheduler and RNG through DeepSpeed's universal checkpoint"


def train(tmp: Path, data: str, name: str, **kw) -> tuple[dict[int, tuple[float, float]], str]:
    """Run `name`; returns {iteration: (loss, grad norm)} and stdout."""
    cfg = tiny_config(tmp, data, name, **{**COMMON, **kw})
    proc = run_cli("deepy.py", "train.py", cfg) if kw.get("num_gpus", 1) > 1 else run_cli("train.py", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in metrics(tmp / name / "logs")}, proc.stdout


def assert_same_steps(got: dict[int, tuple[float, float]], want: dict[int, tuple[float, float]]) -> None:
    assert sorted(got) == [3, 4]
    for it in (3, 4):
        assert got[it] == pytest.approx(want[it], rel=1e-5), f"step {it}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, char_data) -> tuple[Path, dict[int, tuple[float, float]]]:
    """One process, 4 steps, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("reference")
    steps, _ = train(tmp, char_data, "ref", checkpoint_factor=2, **DP1)
    assert sorted(steps) == [1, 2, 3, 4]
    return tmp / "ref" / "ckpt", steps


@pytest.mark.slow
def test_dp2_checkpoint_resumes_at_dp1_with_its_optimizer_state(reference, tmp_path, char_data):
    _, ref = reference
    train(tmp_path, char_data, "dp2", exit_interval=2, num_gpus=2, master_port=29441, **DP2)
    ckpt = tmp_path / "dp2" / "ckpt"
    steps, out = train(tmp_path, char_data, "resume", load=str(ckpt), save=None, **DP1)
    assert (f"resumed from {ckpt} at iteration 2 (16 samples consumed; same layout, DP 2 to DP 1: "
            f"{UNIVERSAL})") in out
    assert_same_steps(steps, ref)
    assert (ckpt / "global_step2" / "universal" / "zero" / "optimizer_state.pt").is_file()
    # A fresh optimizer from the same weights: step 3 (before any update) agrees, step 4 does not.
    fresh, out = train(tmp_path, char_data, "fresh", load=str(ckpt), save=None, no_load_optim=True, **DP1)
    assert "weights only (no_load_optim; optimizer and RNG start fresh)" in out
    assert fresh[3] == pytest.approx(ref[3], rel=1e-5)
    assert abs(fresh[4][0] - ref[4][0]) > 1e-2 * ref[4][0] and abs(fresh[4][1] - ref[4][1]) > 1e-2 * ref[4][1]


@pytest.mark.slow
def test_dp1_checkpoint_resumes_at_dp2(reference, tmp_path, char_data):
    saved, ref = reference
    ckpt = tmp_path / "at_step2"
    shutil.copytree(saved / "global_step2", ckpt / "global_step2")
    (ckpt / "latest").write_text("global_step2")
    steps, out = train(tmp_path, char_data, "resume", load=str(ckpt), save=None, num_gpus=2, master_port=29444, **DP2)
    assert f"same layout, DP 1 to DP 2: {UNIVERSAL}" in out
    assert_same_steps(steps, ref)


@pytest.mark.slow
def test_plain_zero2_tp2_resumes_at_dp1(reference, tmp_path, char_data):
    """Tensor-parallel slices are merged by our rules (row-parallel on dim 1, norms and row biases
    taken once), so the universal folder holds each whole tensor, as the reader merges it."""
    _, ref = reference
    layout = dict(pipe_parallel_size=0, model_parallel_size=2, zero_optimization={"stage": 2})
    train(tmp_path, char_data, "dp2", exit_interval=2, num_gpus=4, master_port=29447, **layout, **DP2)
    ckpt = tmp_path / "dp2" / "ckpt"
    steps, out = train(tmp_path, char_data, "resume", load=str(ckpt), save=None, num_gpus=2, master_port=29450,
                       **layout, **DP1)
    assert f"same layout, DP 2 to DP 1: {UNIVERSAL}" in out
    assert_same_steps(steps, ref)  # every layout computes what one process does
    reader = CheckpointReader(ckpt)
    whole = reader.layer(2, parallel_residual=True)  # the first transformer layer, module index 1
    for key in ("attention.dense.weight", "attention.query_key_value.weight", "input_layernorm.weight",
                "attention.dense.bias"):
        stored = torch.load(reader.path / "universal" / "zero" / f"layers.1.{key}" / "fp32.pt", weights_only=True)
        assert torch.equal(stored["param"], whole[key]), key
