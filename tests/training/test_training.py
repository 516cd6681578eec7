"""Training runs as a user starts them (train.py / deepy.py in subprocesses), on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import metrics, run_cli


def losses(log_dir: Path) -> list[float]:
    return [r["lm_loss"] for r in metrics(log_dir)]


def test_single_process_trains_logs_and_checkpoints(tiny, tmp_path):
    cfg = tiny(tensorboard_dir=str(tmp_path / "run" / "tb"))
    proc = run_cli("train.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(tmp_path / "run" / "logs")
    assert [r["iteration"] for r in records] == list(range(1, 13))
    first, last = records[0]["lm_loss"], records[-1]["lm_loss"]
    assert first > 5.0 and last < first - 1.0, (first, last)  # ln(257) = 5.55 at the start
    assert records[0]["lr"] == pytest.approx(0.003 * 1 / 1)  # warmup 10% of 12 = 1 iteration
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] <= 1 for r in records)
    evals = metrics(tmp_path / "run" / "logs", "eval")
    assert [r["iteration"] for r in evals] == [6, 12] and evals[1]["lm_loss"] < evals[0]["lm_loss"]
    ckpt = tmp_path / "run" / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step12"
    files = sorted(p.name for p in (ckpt / "global_step12").iterdir())
    assert files == ["configs", "layer_00-model_00-model_states.pt", "layer_02-model_00-model_states.pt",
                     "layer_03-model_00-model_states.pt", "layer_05-model_00-model_states.pt",
                     "layer_06-model_00-model_states.pt", "mp_rank_00_model_states.pt"]
    assert (ckpt / "global_step12" / "configs" / "run.yml").is_file()
    layer = torch.load(ckpt / "global_step12" / "layer_02-model_00-model_states.pt", weights_only=False)
    assert layer["attention.query_key_value.weight"].shape == (192, 64)
    assert "attention.rotary_emb.inv_freq" in layer
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert "training finished" in proc.stdout and str(ckpt) in proc.stdout


def test_resume_gives_identical_losses(tiny, tmp_path):
    """exit_interval 5 of 12 iterations: the same command stops at 5, then 10, then ends at 12."""
    full = tiny("full")
    assert run_cli("train.py", full).returncode == 0
    ckpt = tmp_path / "half" / "ckpt"
    half = tiny("half", exit_interval=5, load=str(ckpt))
    for start, stop in ((0, 5), (5, 10), (10, 12)):
        proc = run_cli("train.py", half)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (ckpt / "latest").read_text() == f"global_step{stop}"
        if start:
            assert f"resumed from {ckpt} at iteration {start}" in proc.stdout
    assert losses(tmp_path / "half" / "logs") == losses(tmp_path / "full" / "logs")  # bitwise in fp32
    # Once finished, the same command trains, evaluates and saves nothing.
    saved = {p: p.stat().st_mtime_ns for p in (ckpt / "global_step12").iterdir()}
    records = len(metrics(tmp_path / "half" / "logs", "eval"))
    proc = run_cli("train.py", half)
    assert proc.returncode == 0 and "nothing to train: at iteration 12 of train_iters 12" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in (ckpt / "global_step12").iterdir()} == saved
    assert len(metrics(tmp_path / "half" / "logs", "eval")) == records


def test_resume_restores_dropout_rng_and_loss_scale(tiny, tmp_path):
    """With dropout the resumed steps match only if the RNG states are restored; with fp16 and
    a 2-step scale window the loss scale keeps growing only if the scaler state is restored."""
    kw = dict(train_iters=8, eval_interval=100, hidden_dropout=0.1, attention_dropout=0.1,
              fp16={"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2},
              zero_optimization={"stage": 1})
    assert run_cli("train.py", tiny("full", **kw)).returncode == 0
    assert run_cli("train.py", tiny("half", exit_interval=4, **kw)).returncode == 0
    proc = run_cli("train.py", tiny("half", load=str(tmp_path / "half" / "ckpt"), **kw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, half = metrics(tmp_path / "full" / "logs"), metrics(tmp_path / "half" / "logs")
    assert [r["loss_scale"] for r in half] == [r["loss_scale"] for r in full]
    assert full[-1]["loss_scale"] > full[0]["loss_scale"]
    assert [r["lm_loss"] for r in half] == [r["lm_loss"] for r in full]
    no_dropout = tiny("plain", **{**kw, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    assert run_cli("train.py", no_dropout).returncode == 0
    assert losses(tmp_path / "plain" / "logs") != [r["lm_loss"] for r in full]  # dropout did act


def test_resume_with_larger_train_iters_continues_the_same_samples(tiny, tmp_path):
    """Sample order depends on the seed and the data, not on train_iters: 4 steps, then the same
    run extended to 8, equals 8 steps in one go (the LR schedule is pinned by lr_decay_iters)."""
    kw = dict(lr_decay_iters=8, eval_interval=100, checkpoint_factor=None)
    assert run_cli("train.py", tiny("full", train_iters=8, **kw)).returncode == 0
    ckpt = str(tmp_path / "grow" / "ckpt")
    assert run_cli("train.py", tiny("grow", train_iters=4, **kw)).returncode == 0
    proc = run_cli("train.py", tiny("grow", train_iters=8, load=ckpt, **kw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at iteration 4" in proc.stdout
    assert losses(tmp_path / "grow" / "logs") == losses(tmp_path / "full" / "logs")


def test_finetune_loads_weights_only(tiny, tmp_path):
    assert run_cli("train.py", tiny("base", train_iters=4)).returncode == 0
    proc = run_cli("train.py", tiny("ft", load=str(tmp_path / "base" / "ckpt"), finetune=True, train_iters=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ft = metrics(tmp_path / "ft" / "logs")
    assert [r["iteration"] for r in ft] == [1, 2, 3]
    # Starts from trained weights: lower loss than a fresh model's ln(257) ~ 5.55.
    assert ft[0]["lm_loss"] < losses(tmp_path / "base" / "logs")[0] - 0.3


def test_keep_last_n_checkpoints(tiny, tmp_path):
    proc = run_cli("train.py", tiny(checkpoint_factor=3, keep_last_n_checkpoints=2, eval_interval=100))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir()) == ["global_step12", "global_step9", "latest"]


def test_fp16_overflow_skips_steps_and_lowers_scale(tiny, tmp_path):
    # A loss scale of 2**20 overflows fp16 gradients of this model: the step is skipped, counted,
    # and the scale halves (hysteresis 1) until gradients fit.
    cfg = tiny(fp16={"enabled": True, "initial_scale_power": 20, "hysteresis": 1},
               zero_optimization={"stage": 1}, train_iters=8, eval_interval=100)
    proc = run_cli("train.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = metrics(tmp_path / "run" / "logs")
    scales = [r["loss_scale"] for r in recs]
    skipped = [r["skipped_iters"] for r in recs]
    assert skipped[0] == 1 and scales[0] == 2.0**19
    assert skipped == sorted(skipped) and 1 < skipped[-1] < 8
    assert scales == sorted(scales, reverse=True) and scales[-1] <= 2.0**17
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 0.5  # the applied steps learn


def test_plain_engine_matches_pipeline_engine(tiny, tmp_path):
    for name, pp in (("pipe", 1), ("plain", 0)):
        proc = run_cli("train.py", tiny(name, pipe_parallel_size=pp, train_iters=4, eval_interval=100))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(tmp_path / "pipe" / "logs"), losses(tmp_path / "plain" / "logs")
    assert a == pytest.approx(b, rel=1e-6)


def test_activation_checkpointing_same_losses(tiny, tmp_path):
    for name, ckpt in (("off", False), ("on", True)):
        assert run_cli("train.py", tiny(name, checkpoint_activations=ckpt, train_iters=3, eval_interval=100)).returncode == 0
    assert losses(tmp_path / "on" / "logs") == pytest.approx(losses(tmp_path / "off" / "logs"), rel=1e-6)


@pytest.mark.slow
def test_two_processes_match_one(tiny, tmp_path):
    """Data parallel 2 x micro 4 equals one process accumulating 2 micro-batches of 4."""
    one = tiny("one", train_iters=4, eval_interval=100)
    assert run_cli("train.py", one).returncode == 0
    two = tiny("two", train_iters=4, eval_interval=100, gradient_accumulation_steps=1, num_gpus=2,
               zero_optimization={"stage": 1}, master_port=29531)
    proc = run_cli("deepy.py", "train.py", two)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching (local):" in proc.stdout
    a, b = losses(tmp_path / "one" / "logs"), losses(tmp_path / "two" / "logs")
    assert b == pytest.approx(a, rel=1e-5) and b[-1] < b[0]
    # DeepSpeed's CPU backend leaves a 66 MiB /dev/shm file per rank unless we unlink it
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_29531_*"))


def test_deepy_rejects_bad_config_before_launch(tiny):
    proc = run_cli("deepy.py", "train.py", tiny(num_layer=3))
    assert proc.returncode == 2
    assert "config error: unknown config key 'num_layer'" in proc.stderr and "'num_layers'" in proc.stderr
    assert "launching" not in proc.stdout


def test_missing_checkpoint_directory_is_named(tiny, tmp_path):
    load = tmp_path / "broken"
    load.mkdir()
    (load / "latest").write_text("global_step7")
    proc = run_cli("train.py", tiny(load=str(load), train_iters=1))
    assert proc.returncode == 2
    assert f"{load}/latest names 'global_step7' but {load}/global_step7 does not exist" in proc.stderr


@pytest.mark.parametrize("name, extra", [
    ("bf16_zero1_pipe", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}),
    ("bf16_zero3_plain", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "pipe_parallel_size": 0}),
    ("fp32_zero2_plain", {"zero_optimization": {"stage": 2}, "pipe_parallel_size": 0}),
])
def test_precisions_and_zero_stages_follow_fp32(tiny, tmp_path, name, extra):
    """Every precision/ZeRO combination learns and tracks the fp32 ZeRO-0 run.

    Tolerances reached: fp32 with ZeRO 2 equals ZeRO 0 to 1e-6 (same arithmetic, sharded);
    bf16 (8-bit mantissa) stays within 2% of the fp32 losses over these 6 steps."""
    ref = tiny("ref", train_iters=6, eval_interval=100)
    assert run_cli("train.py", ref).returncode == 0
    proc = run_cli("train.py", tiny(name, train_iters=6, eval_interval=100, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(tmp_path / "ref" / "logs"), losses(tmp_path / name / "logs")
    assert b[-1] < b[0] - 0.5
    assert b == pytest.approx(a, rel=2e-2 if "bf16" in name else 1e-6)


def test_truncated_checkpoint_file_is_named(tiny, tmp_path):
    assert run_cli("train.py", tiny(train_iters=2, eval_interval=100)).returncode == 0
    layer = tmp_path / "run" / "ckpt" / "global_step2" / "layer_02-model_00-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:100])
    proc = run_cli("train.py", tiny(train_iters=3, eval_interval=100, load=str(tmp_path / "run" / "ckpt")))
    assert proc.returncode == 2
    assert f"error: {layer}: not a complete PyTorch checkpoint file (truncated or corrupt" in proc.stderr


@pytest.fixture
def raw_jsonl(tmp_path):
    """The char dataset's sources as raw jsonl shards, for streaming."""
    import json
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for i, pkg in enumerate(("json", "email")):
        path = tmp_path / f"shard{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in sorted((stdlib / pkg).glob("*.py"))))
        paths.append(str(path))
    return paths


def test_streaming_from_raw_files_resumes_identically(tiny, tmp_path, raw_jsonl):
    stream = dict(data_impl="stream", data_path=None, train_data_paths=raw_jsonl, valid_data_paths=raw_jsonl[:1],
                  num_workers=1, eval_interval=100, train_iters=6)
    assert run_cli("train.py", tiny("full", **stream)).returncode == 0
    proc = run_cli("train.py", tiny("half", **stream, exit_interval=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("train.py", tiny("half", **stream, load=str(tmp_path / "half" / "ckpt")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = losses(tmp_path / "full" / "logs")
    assert losses(tmp_path / "half" / "logs") == full and full[-1] < full[0] - 0.5
    assert metrics(tmp_path / "full" / "logs", "eval")  # the validation stream was evaluated


def test_blended_prefixes_train(tiny, tmp_path, char_data):
    blend = dict(data_path=None, train_data_paths=[char_data, char_data], train_data_weights=[0.3, 0.7],
                 valid_data_paths=[char_data], train_iters=4, eval_interval=100)
    proc = run_cli("train.py", tiny(**blend))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(tmp_path / "run" / "logs")
    assert len(got) == 4 and got[-1] < got[0]
    bad = run_cli("train.py", tiny("bad", **dict(blend, train_data_weights=[1.0])))
    assert bad.returncode == 2 and "train_data_weights has 1 entries but train_data_paths has 2" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("pp", [1, 0])
def test_compiled_loss_matches_eager(tiny, tmp_path, pp):
    """compile_loss: the same losses (train and eval) through the pipeline and the plain engine,
    and the compiled path really runs (no fallback message)."""
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        proc = run_cli("train.py", tiny(name, compile_loss=compiled, pipe_parallel_size=pp, train_iters=4,
                                        eval_interval=2))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "compile_loss: torch.compile failed" not in proc.stderr
        runs[name] = (losses(tmp_path / name / "logs"), [r["lm_loss"] for r in metrics(tmp_path / name / "logs", "eval")])
    (train_e, eval_e), (train_c, eval_c) = runs["eager"], runs["compiled"]
    assert len(train_c) == 4 and len(eval_c) == 2
    assert train_c == pytest.approx(train_e, rel=1e-5) and eval_c == pytest.approx(eval_e, rel=1e-5)


def test_token_ids_outside_the_vocabulary_are_named_before_training(tiny, tmp_path):
    """Data made with another tokenizer: one line naming the file, the document and the id,
    instead of an IndexError inside the embedding at step 1."""
    import numpy as np

    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    prefix = str(tmp_path / "other_text_document")
    builder = MMapIndexedDatasetBuilder(prefix, np.uint16)
    for doc in ([5] * 300, [7] * 200 + [1000] + [7] * 99, [9] * 300):
        builder.add_document(doc)
    builder.finalize()
    proc = run_cli("train.py", tiny(data_path=prefix, split="100,0,0", train_iters=1, eval_interval=100))
    assert proc.returncode == 2
    assert (f"error: {prefix}.bin: document 1 holds token id 1000, outside the tokenizer's 257 ids "
            "(made with another tokenizer?)") in proc.stderr


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(tiny, tmp_path):
    """fp32 with an absurd learning rate: the loss is NaN at step 4. The run stops there with the
    iteration named, and `latest` stays on the step-3 checkpoint (the last good one)."""
    cfg = tiny(train_iters=8, checkpoint_factor=1, eval_interval=100, warmup=0.0, gradient_clipping=0.0,
               optimizer={"type": "Adam", "params": {"lr": 1.0e4, "betas": [0.9, 0.95], "eps": 1.0e-8}})
    proc = run_cli("train.py", cfg)
    assert proc.returncode == 2
    ckpt = tmp_path / "run" / "ckpt"
    assert (f"error: iteration 4: the loss is nan (fp32); stopping without saving, so {ckpt}/latest still names "
            "the last good checkpoint") in proc.stderr
    assert (ckpt / "latest").read_text() == "global_step3" and not (ckpt / "global_step4").exists()
    assert len(losses(tmp_path / "run" / "logs")) == 3


def test_resume_says_when_the_lr_schedule_is_stretched(tiny, tmp_path):
    kw = dict(eval_interval=100, checkpoint_factor=None, load=str(tmp_path / "run" / "ckpt"))
    assert run_cli("train.py", tiny(train_iters=4, **kw)).returncode == 0
    proc = run_cli("train.py", tiny(train_iters=6, **kw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("learning-rate schedule: lr_decay_iters 4 in the checkpoint, 6 in this config: from iteration 4 the "
            "rate follows this config; set use_checkpoint_lr_scheduler: true to keep the checkpoint's schedule, or "
            "override_lr_scheduler: true to follow this config without this notice") in proc.stdout
