"""Every parallel layout trains the same model to the same losses as one process (fp32, gloo).

Each layout keeps the global batch (8 sequences) and the padded vocabulary (512 rows, so the
model is the same whatever the tensor-parallel size) and runs 4 steps with gradient clipping on.
Tolerance reached: 1e-5 relative on every logged loss and gradient norm in fp32 (pipeline and
plain engine, ZeRO 0 to 3); with TP2 in bf16 the losses and gradient norms stay within 2% of the
fp32 reference and in fp16 within 0.2% (LOOSE; measured: bf16 0.4%, fp16 0.03% at most).

With dropout a layout matches one process only where it draws the same masks; the dropout tests
below pin down which layouts do (see README "Parallelism").
"""

from __future__ import annotations

import math

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
    # The plain engine (no pipeline) at every ZeRO stage: DeepSpeed computes the gradient norm
    # (ZeRO 2 and 3 in their own optimizers), counting tensor-parallel shards once via the mpu.
    "dp2_plain": dict(gradient_accumulation_steps=2, pipe_parallel_size=0),
    "dp2_plain_zero2": dict(gradient_accumulation_steps=2, pipe_parallel_size=0, zero_optimization={"stage": 2}),
    "dp2_plain_zero3": dict(gradient_accumulation_steps=2, pipe_parallel_size=0, zero_optimization={"stage": 3}),
    "tp2_plain_zero2": dict(model_parallel_size=2, pipe_parallel_size=0, zero_optimization={"stage": 2}),
    "tp2_plain_zero3": dict(model_parallel_size=2, pipe_parallel_size=0, zero_optimization={"stage": 3}),
    "tp2_dp2_plain_zero3": dict(model_parallel_size=2, gradient_accumulation_steps=2, pipe_parallel_size=0,
                                zero_optimization={"stage": 3}),
}
SLOW = {"pp4", "tp2_pp2", "tp2_pp2_dp2", "tp2_pp2_ckpt", "tp2_pp2_dp2_zero0", "dp2_plain", "dp2_plain_zero2",
        "dp2_plain_zero3", "tp2_plain_zero2", "tp2_plain_zero3", "tp2_dp2_plain_zero3"}
# bf16 keeps 8 mantissa bits, fp16 11: losses AND gradient norms stay within these of the fp32
# run over 4 steps (measured at most: bf16 3e-5 on losses, 0.4% on norms; fp16 2e-5, 0.03%).
LOOSE = {"tp2_bf16": 2e-2, "tp2_fp16": 2e-3}
# Fixed ports, one per layout (layouts run one after another; other tests use other ports).
PORTS = {name: 29600 + i for i, name in enumerate(LAYOUTS)}


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
    ref = trajectory(tmp / "ref" / "logs")
    assert len(ref) == 4
    return ref


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LAYOUTS])
def test_layout_matches_single_process(name, reference, tiny, tmp_path):
    layout = LAYOUTS[name]
    tp = layout.get("model_parallel_size", 1)
    cfg = tiny(name, **{**REFERENCE, **layout, "make_vocab_size_divisible_by": 512 // tp,
                        "num_gpus": world(layout), "master_port": PORTS[name]})
    proc = run_cli("deepy.py", "train.py", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = trajectory(tmp_path / name / "logs")
    assert len(got) == 4 and len(reference) == 4
    rel = LOOSE.get(name, 1e-5)
    for (loss, norm), (ref_loss, ref_norm) in zip(got, reference):
        assert loss == pytest.approx(ref_loss, rel=rel)
        assert norm == pytest.approx(ref_norm, rel=rel)


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
    assert len(reference) == 4
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
    got, ref = trajectory(tmp_path / "tied" / "logs"), trajectory(tmp_path / "ref" / "logs")
    assert len(got) == len(ref) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(got, ref):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Dropout. One process draws hidden-dropout masks from the default generator and attention-
# dropout masks from the tensor-parallel stream (megatron/parallel/random.py). A layout matches
# it only where it draws the very same masks:
# - TP without sequence parallelism: hidden dropout acts on the replicated residual stream, from
#   the default generator seeded alike on every rank, so its masks are one process's. Attention
#   dropout draws each rank's heads from that rank's stream (seed + 2718 + tp rank), so those
#   masks are not.
# - Sequence parallelism: hidden dropout acts on sequence shards, from the per-rank stream.
# - PP: every stage seeds both generators as stage 0 does, so a later stage's layers draw from
#   the start of the streams instead of continuing them.
# - DP: every data-parallel rank draws the same mask sequence for its own micro-batches (DP2:
#   masks 1-2 on each rank, where one process draws masks 1-4 for its 4 micro-batches).
# Those layouts must still train the same model (finite, falling losses close to one process's);
# and activation checkpointing must replay both streams exactly in every layout.

DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)
DROPOUT_LAYOUTS = {  # name: (layout, master port)
    "tp2": (dict(model_parallel_size=2), 29110),
    "tp2_sp": (dict(model_parallel_size=2, sequence_parallel=True), 29111),
    "pp2": (dict(pipe_parallel_size=2), 29112),
    "dp2": (dict(gradient_accumulation_steps=2), 29113),
    "tp2_ckpt": (dict(model_parallel_size=2, checkpoint_activations=True), 29114),
}


def run_layout(tmp_path, char_data, name: str, port: int | None = None, **layout) -> list[tuple[float, float]]:
    """Train REFERENCE + layout (one process when port is None); returns its 4 records."""
    from helpers import tiny_config

    tp = layout.get("model_parallel_size", 1)
    values = {**REFERENCE, **layout, "make_vocab_size_divisible_by": 512 // tp}
    if port is None:
        assert world(layout) == 1
        proc = run_cli("train.py", tiny_config(tmp_path, char_data, name, **values))
    else:
        cfg = tiny_config(tmp_path, char_data, name, **values, num_gpus=world(layout), master_port=port)
        proc = run_cli("deepy.py", "train.py", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = trajectory(tmp_path / name / "logs")
    assert len(got) == 4
    return got


def assert_same(got, ref, rel=1e-5):
    assert len(got) == len(ref) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(got, ref):
        assert loss == pytest.approx(ref_loss, rel=rel) and norm == pytest.approx(ref_norm, rel=rel)


def largest_difference(got, ref) -> float:
    """The largest relative difference of any step's loss or gradient norm."""
    assert len(got) == len(ref) == 4
    return max(abs(a - b) / abs(b) for g, r in zip(got, ref) for a, b in zip(g, r))


@pytest.fixture(scope="module")
def dropout_reference(tmp_path_factory, char_data, reference):
    ref = run_layout(tmp_path_factory.mktemp("dropout_ref"), char_data, "ref", **DROPOUT)
    # Dropout is on: this run is not the dropout-free one (else every test below is vacuous).
    assert largest_difference(ref, reference) > 1e-2
    return ref


@pytest.mark.parametrize("pipe", [1, 0])
def test_dropout_checkpointing_replays_masks_in_one_process(pipe, dropout_reference, tmp_path, char_data):
    """Recomputing the layers in the backward pass draws the forward's masks again, from both
    streams (the default generator: torch's checkpoint; the tensor-parallel one:
    checkpoint_context), inside the pipeline engine (pipe 1) and the plain model (pipe 0)."""
    got = run_layout(tmp_path, char_data, "ckpt", pipe_parallel_size=pipe, checkpoint_activations=True, **DROPOUT)
    assert_same(got, dropout_reference)


@pytest.mark.slow
def test_dropout_tp2_hidden_masks_are_one_process_masks(tmp_path, char_data, dropout_reference):
    """Hidden dropout alone under TP2 (replicated activations, the shared default generator)."""
    ref = run_layout(tmp_path, char_data, "ref_hidden", hidden_dropout=0.1)
    assert largest_difference(ref, dropout_reference) > 1e-4  # attention dropout mattered there
    got = run_layout(tmp_path, char_data, "tp2_hidden", 29115, model_parallel_size=2, hidden_dropout=0.1)
    assert_same(got, ref)


@pytest.fixture(scope="module")
def dropout_runs(tmp_path_factory, char_data):
    """Each dropout layout trained once per module (tp2 serves two tests)."""
    cache: dict[str, list] = {}

    def get(name: str) -> list[tuple[float, float]]:
        if name not in cache:
            layout, port = DROPOUT_LAYOUTS[name]
            cache[name] = run_layout(tmp_path_factory.mktemp(name), char_data, name, port, **layout, **DROPOUT)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DROPOUT_LAYOUTS))
def test_dropout_layouts_train_with_their_own_masks(name, dropout_runs, dropout_reference):
    """Hidden and attention dropout on TP2, TP2 + SP, PP2, DP2 and TP2 with checkpointing: each
    draws some masks one process does not (see above), so its numbers differ from one process's
    by far more than the 1e-5 of matching layouts (measured 0.6% to 7% on some gradient norm),
    yet it trains the same model: finite losses that fall every step, within 1% of one process's."""
    got = dropout_runs(name)
    assert largest_difference(got, dropout_reference) > 1e-3
    losses = [loss for loss, _ in got]
    assert all(math.isfinite(v) for step in got for v in step)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert losses == pytest.approx([loss for loss, _ in dropout_reference], rel=1e-2)


@pytest.mark.slow
def test_dropout_tp2_checkpointing_replays_per_rank_masks(dropout_runs):
    """TP2 with activation checkpointing equals TP2 without: the recompute replays the per-rank
    attention masks and the shared hidden ones."""
    assert_same(dropout_runs("tp2_ckpt"), dropout_runs("tp2"))


# ---------------------------------------------------------------------------------------------
# Llama-shaped models: RMSNorm, SwiGLU (a gated dense_h_to_4h split block by block), no biases,
# untied, full rotary, no vocabulary padding, grouped-query attention (4 heads, 2 key/value heads:
# one per tensor rank at TP2).
LLAMA = dict(norm="rmsnorm", rms_norm_epsilon=1e-6, activation="swiglu", mlp_multiple_of=32, use_bias_in_norms=False,
             use_bias_in_attn_linear=False, use_bias_in_mlp=False, rotary_pct=1.0, gpt_j_residual=False,
             no_weight_tying=True, make_vocab_size_divisible_by=1, num_kv_heads=2)


@pytest.mark.slow
def test_llama_tp2_pp2_matches_single_process(tmp_path, char_data):
    """The vocabulary is unpadded in one process (257) and padded to 258 at TP2: the padding row
    is masked, so both are the same model."""
    from helpers import tiny_config

    runs = {"llama_ref": {}, "llama_tp2_pp2": dict(model_parallel_size=2, pipe_parallel_size=2, num_gpus=4,
                                                   master_port=29951)}
    got = {}
    for name, layout in runs.items():
        cfg = tiny_config(tmp_path, char_data, name, **{**REFERENCE, **LLAMA, **layout})
        proc = run_cli("deepy.py", "train.py", cfg) if layout else run_cli("train.py", cfg)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        got[name] = trajectory(tmp_path / name / "logs")
    assert_same(got["llama_tp2_pp2"], got["llama_ref"])
