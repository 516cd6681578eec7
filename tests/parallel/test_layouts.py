"""Every parallel layout trains the same model to the same losses as one process (fp32, gloo).

Each layout keeps the global batch (8 sequences) and the padded vocabulary (512 rows, so the
model is the same whatever the tensor-parallel size) and runs 4 steps with gradient clipping on.
Tolerance reached: 1e-5 relative on every logged loss and gradient norm.
"""

from __future__ import annotations

import pytest

from helpers import metrics, run_cli

REFERENCE = dict(num_layers=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4,
                 train_iters=4, eval_interval=100, zero_optimization={"stage": 1}, checkpoint_factor=None,
                 save=None, make_vocab_size_divisible_by=512)

LAYOUTS = {
    "tp2": dict(model_parallel_size=2),
    "pp2": dict(pipe_parallel_size=2),
    "dp2": dict(gradient_accumulation_steps=2),
    "tp2_sp": dict(model_parallel_size=2, sequence_parallel=True),
    "tp2_plain": dict(model_parallel_size=2, pipe_parallel_size=0),
    "pp4": dict(pipe_parallel_size=4),
    "tp2_pp2": dict(model_parallel_size=2, pipe_parallel_size=2),
    "tp2_pp2_dp2": dict(model_parallel_size=2, pipe_parallel_size=2, gradient_accumulation_steps=2),
}
SLOW = {"pp4", "tp2_pp2", "tp2_pp2_dp2"}


def world(layout: dict) -> int:
    tp, pp = layout.get("model_parallel_size", 1), max(layout.get("pipe_parallel_size", 1), 1)
    return tp * pp * (8 // (2 * layout.get("gradient_accumulation_steps", 4)))


def trajectory(log_dir) -> list[tuple[float, float]]:
    return [(r["lm_loss"], r["grad_norm"]) for r in metrics(log_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, char_data):
    from helpers import tiny_config

    tmp = tmp_path_factory.mktemp("reference")
    proc = run_cli("train.py", tiny_config(tmp, char_data, "ref", **REFERENCE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return trajectory(tmp / "ref" / "logs")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LAYOUTS])
def test_layout_matches_single_process(name, reference, tiny, tmp_path):
    layout = LAYOUTS[name]
    tp = layout.get("model_parallel_size", 1)
    cfg = tiny(name, **{**REFERENCE, **layout, "make_vocab_size_divisible_by": 512 // tp,
                        "num_gpus": world(layout), "master_port": 29600 + hash(name) % 300})
    proc = run_cli("deepy.py", "train.py", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = trajectory(tmp_path / name / "logs")
    assert len(got) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(got, reference):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-5)
