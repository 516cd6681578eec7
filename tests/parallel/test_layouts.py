"""Every parallel layout trains the same model to the same losses as one process (fp32, gloo).

Each layout keeps the global batch (8 sequences) and the padded vocabulary (512 rows, so the
model is the same whatever the tensor-parallel size) and runs 4 steps with gradient clipping on.
Tolerance reached: 1e-5 relative on every logged loss and gradient norm in fp32; with TP2 in
bf16 the losses stay within 2% of the fp32 reference and in fp16 within 0.2% (LOOSE).
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
    "tp2_pp2_ckpt": dict(model_parallel_size=2, pipe_parallel_size=2, checkpoint_activations=True),
    # ZeRO 0: the framework clips and computes the norm (clip_in_optimizer), DeepSpeed does not.
    "zero0": dict(zero_optimization={"stage": 0}),
    "tp2_zero0": dict(model_parallel_size=2, zero_optimization={"stage": 0}),
    "tp2_pp2_dp2_zero0": dict(model_parallel_size=2, pipe_parallel_size=2, gradient_accumulation_steps=2,
                              zero_optimization={"stage": 0}),
    # Mixed precision against the fp32 reference (the tolerance is in LOOSE).
    "tp2_bf16": dict(model_parallel_size=2, bf16={"enabled": True}),
    "tp2_fp16": dict(model_parallel_size=2, fp16={"enabled": True, "initial_scale_power": 12}),
}
SLOW = {"pp4", "tp2_pp2", "tp2_pp2_dp2", "tp2_pp2_ckpt", "tp2_pp2_dp2_zero0"}
# bf16 keeps 8 mantissa bits, fp16 11: losses stay within these of the fp32 run over 4 steps.
LOOSE = {"tp2_bf16": 2e-2, "tp2_fp16": 2e-3}


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
    rel = LOOSE.get(name, 1e-5)
    for (loss, norm), (ref_loss, ref_norm) in zip(got, reference):
        assert loss == pytest.approx(ref_loss, rel=rel)
        assert norm == pytest.approx(ref_norm, rel=max(rel, 1e-5) * 5 if name in LOOSE else rel)


def test_tensor_parallel_checkpoint_files_and_resume(reference, tiny, tmp_path):
    """TP2 x PP2 writes one file per layer and model rank, and resumes to the same losses."""
    layout = dict(REFERENCE, model_parallel_size=2, pipe_parallel_size=2, make_vocab_size_divisible_by=256,
                  num_gpus=4, master_port=29931, save=str(tmp_path / "ck"), checkpoint_factor=2)
    assert run_cli("deepy.py", "train.py", tiny("a", **layout, exit_interval=2)).returncode == 0
    step = tmp_path / "ck" / "global_step2"
    names = sorted(p.name for p in step.iterdir() if p.name.startswith("layer_"))
    expected = [f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in (0, 2, 3, 4, 5, 7, 8) for r in (0, 1)]
    assert names == expected
    proc = run_cli("deepy.py", "train.py", tiny("a", **layout, load=str(tmp_path / "ck")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [loss for loss, _ in trajectory(tmp_path / "a" / "logs")] == pytest.approx(
        [loss for loss, _ in reference], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 0])
def test_tied_embeddings_across_tensor_and_pipeline_ranks(tiny, tmp_path, stage):
    """The input embedding doubles as the output layer on the last stage (DeepSpeed's tied
    layer): TP2 x PP2 trains it exactly as one process does, and counts it once in the gradient
    norm (ZeRO 1: DeepSpeed's norm; ZeRO 0: clip_in_optimizer's)."""
    tied = dict(REFERENCE, no_weight_tying=False, zero_optimization={"stage": stage})
    assert run_cli("train.py", tiny("ref", **tied)).returncode == 0
    proc = run_cli("deepy.py", "train.py", tiny("tied", **dict(tied, model_parallel_size=2, pipe_parallel_size=2,
                                                            make_vocab_size_divisible_by=256, num_gpus=4,
                                                            master_port=29941 + stage)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (loss, norm), (ref_loss, ref_norm) in zip(trajectory(tmp_path / "tied" / "logs"), trajectory(tmp_path / "ref" / "logs")):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)
