"""GPT-NeoX training switches the Pythia and 20B configs use: extra_save_iters, no_save_optim,
no_save_rng / no_load_rng, override_lr_scheduler / use_checkpoint_lr_scheduler, eod_mask_loss
and the test split evaluated at the end of training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import metrics, run_cli
from megatron.data.loader import IGNORE, micro_batches
from megatron.model.loss import loss_function
from megatron.training.lr_schedule import AnnealingLR
from megatron.training.resume import schedule_notice


def test_eod_mask_loss_is_the_masked_mean_by_hand():
    """Two samples of 5 tokens, eod id 0. Positions whose INPUT is eod are left out (GPT-NeoX's
    get_ltor_masks_and_position_ids masks `data == eod`, data being the inputs)."""
    samples = [np.array([3, 0, 2, 2, 1]), np.array([0, 1, 0, 4, 0])]
    tokens, labels = next(micro_batches(samples, 0, 2, 1, 0, mask_token=0))
    assert tokens.tolist() == [[3, 0, 2, 2], [0, 1, 0, 4]]
    assert labels.tolist() == [[0, IGNORE, 2, 1], [IGNORE, 0, IGNORE, 0]]  # the last eod is a target: kept
    logits = torch.linspace(-2.0, 3.0, 2 * 4 * 5).reshape(2, 4, 5).sin() * 3
    kept = [(b, s, int(t)) for b, row in enumerate(labels) for s, t in enumerate(row) if t >= 0]
    by_hand = [math.log(sum(math.exp(float(v)) for v in logits[b, s])) - float(logits[b, s, t]) for b, s, t in kept]
    expected = sum(by_hand) / len(by_hand)  # 5 of 8 positions
    assert len(by_hand) == 5
    masked = loss_function(masked=True)(logits.requires_grad_(), labels)
    assert masked.item() == pytest.approx(expected, rel=1e-6)
    masked.backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[1, 0].abs().sum() == 0  # no gradient where masked
    unmasked = next(micro_batches(samples, 0, 2, 1, 0))[1]
    assert (unmasked >= 0).all()
    assert loss_function()(logits.detach(), unmasked).item() != pytest.approx(expected, rel=1e-3)


def schedule(max_lr: float, decay: int, use_checkpoint: bool = False) -> AnnealingLR:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return AnnealingLR(opt, max_lr, 0.1 * max_lr, 2, decay, "linear", use_checkpoint_schedule=use_checkpoint)


def test_lr_schedule_on_resume_follows_the_chosen_source():
    saved = schedule(1.0, 12)
    saved.step(6)
    state = saved.state_dict()
    assert state == {"num_iters": 6, "max_lr": 1.0, "min_lr": 0.1, "warmup_iters": 2, "decay_iters": 12,
                     "style": "linear"}
    # this config's values (default and override_lr_scheduler): linear from 0.5 to 0.05 over 2..20,
    # at 6: 0.05 + (1 - 4/18) * 0.45 = 0.4
    mine = schedule(0.5, 20)
    mine.load_state_dict(state)
    assert mine.get_lr() == pytest.approx(0.4) and mine.optimizer.param_groups[0]["lr"] == pytest.approx(0.4)
    assert mine.changes == [("max_lr", 1.0, 0.5), ("min_lr", 0.1, 0.05), ("decay_iters", 12, 20)]
    # use_checkpoint_lr_scheduler: the checkpoint's, 0.1 + (1 - 4/10) * 0.9 = 0.64, then on to 0.1 at 12
    kept = schedule(0.5, 20, use_checkpoint=True)
    kept.load_state_dict(state)
    assert kept.get_lr() == pytest.approx(0.64) and kept.lr_at(12) == pytest.approx(0.1)
    # A checkpoint of an older version holds the step count only: nothing differs
    old = schedule(0.5, 20, use_checkpoint=True)
    old.load_state_dict({"num_iters": 6})
    assert old.changes == [] and old.get_lr() == pytest.approx(0.4)
    line = schedule_notice(mine.changes, 6, False, False)
    assert line == ("learning-rate schedule: lr 1.0 in the checkpoint, 0.5 in this config; min_lr 0.1 in the "
                    "checkpoint, 0.05 in this config; lr_decay_iters 12 in the checkpoint, 20 in this config: from "
                    "iteration 6 the rate follows this config; set use_checkpoint_lr_scheduler: true to keep the "
                    "checkpoint's schedule, or override_lr_scheduler: true to follow this config without this notice")


def engine_state(ckpt, step: int) -> dict:
    return torch.load(ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt", weights_only=False)


def test_pythia_checkpoint_switches(tiny, tmp_path):
    """One 12-step ZeRO-1 run as the reference; the same run with extra_save_iters, no_save_optim
    and no_save_rng stopped at 6; resumes from it in each way the switches allow."""
    kw = dict(train_iters=12, checkpoint_factor=6, extra_save_iters=[1, 2, 4], eval_interval=100, split="80,10,10",
              zero_optimization={"stage": 1})
    proc = run_cli("train.py", tiny("full", **kw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, ckpt = metrics(tmp_path / "full" / "logs"), tmp_path / "full" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("global_step*")) == [f"global_step{i}" for i in (1, 12, 2, 4, 6)]
    assert list((ckpt / "global_step6").glob("*optim_states.pt")) and "rng" in engine_state(ckpt, 6)
    # test_data_paths / the split's test part: evaluated once, at the end, logged like validation
    tests = metrics(tmp_path / "full" / "logs", "test")
    assert [r["iteration"] for r in tests] == [12] and 3.0 < tests[0]["lm_loss"] < 5.5
    assert f" test loss at iteration       12 | lm loss {tests[0]['lm_loss']:.4E}" in proc.stdout

    proc = run_cli("train.py", tiny("slim", **kw, exit_interval=6, no_save_optim=True, no_save_rng=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    slim = tmp_path / "slim" / "ckpt"
    assert sorted(p.name for p in slim.glob("global_step*")) == [f"global_step{i}" for i in (1, 2, 4, 6)]
    assert not list(slim.glob("*/*optim_states.pt"))
    state = engine_state(slim, 6)
    assert state["optimizer"] is None and "rng" not in state and state["lr_scheduler"]["num_iters"] == 6
    assert not metrics(tmp_path / "slim" / "logs", "test")  # stopped before train_iters: no test evaluation

    # Same layout without optimizer state: RNG states are needed unless no_load_rng
    proc = run_cli("train.py", tiny("norng", **kw, load=str(slim), no_load_optim=True))
    assert proc.returncode == 2
    assert (f"error: {slim}/global_step6 holds no RNG states (saved with no_save_rng); set no_load_rng: true to "
            "resume with this run's seeds, or finetune: true") in proc.stderr

    def resumed(name: str, **extra) -> list[dict]:
        proc = run_cli("train.py", tiny(name, **kw, load=str(slim), **extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = metrics(tmp_path / name / "logs")
        assert [r["iteration"] for r in records] == list(range(7, 13))
        # the restored weights give step 7 the reference's loss (the optimizer restarts after it)
        assert records[0]["lm_loss"] == full[6]["lm_loss"]
        return records, proc.stdout

    # Plain resume: weights loaded as from another layout; the schedule is restored, not restarted
    records, out = resumed("weights")
    assert "no optimizer state in it; optimizer and RNG start fresh" in out
    assert [r["lr"] for r in records] == [r["lr"] for r in full[6:]]
    # A lower lr on resume: use_checkpoint_lr_scheduler keeps the checkpoint's schedule...
    low = {"optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1.0e-8}}}
    records, out = resumed("keep", **low, no_load_optim=True, no_load_rng=True, use_checkpoint_lr_scheduler=True)
    assert "lr 0.003 in the checkpoint, 0.001 in this config: following the checkpoint's" in out
    assert [r["lr"] for r in records] == [r["lr"] for r in full[6:]]
    # ...override_lr_scheduler takes this config's: cosine 0.001 -> 0.0003 over iterations 1..12
    records, out = resumed("override", **low, no_load_optim=True, no_load_rng=True, override_lr_scheduler=True)
    assert "following this config's (override_lr_scheduler)" in out
    expect = [0.0003 + 0.0007 * 0.5 * (1 + math.cos(math.pi * (i - 1) / 11)) for i in range(7, 13)]
    assert [r["lr"] for r in records] == pytest.approx(expect, rel=1e-9)


def test_partitioned_checkpoint_keeps_a_slice_and_replays_the_tp_stream():
    from helpers import run_distributed
    from training.neox_feature_workers import partitioned_checkpoint_matches_plain

    run_distributed(partitioned_checkpoint_matches_plain, 2)


@pytest.mark.slow
def test_partition_activations_tp2_matches_one_process(tiny, tmp_path):
    """TP2 with checkpoint_activations + partition_activations (DeepSpeed's partitioning over the
    tensor-parallel group, no sequence parallelism) against one process: every step's loss and
    gradient norm within 1e-5 (measured: losses equal, norms within 3e-7)."""
    kw = dict(num_layers=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4, train_iters=3,
              eval_interval=100, zero_optimization={"stage": 1}, checkpoint_factor=None, save=None,
              checkpoint_activations=True)
    proc = run_cli("train.py", tiny("one", **kw, make_vocab_size_divisible_by=512))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("deepy.py", "train.py", tiny("tp2", **kw, make_vocab_size_divisible_by=256, model_parallel_size=2,
                                                partition_activations=True, num_gpus=2, master_port=29871))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, tp2 = metrics(tmp_path / "one" / "logs"), metrics(tmp_path / "tp2" / "logs")
    assert len(one) == len(tp2) == 3 and one[-1]["lm_loss"] < one[0]["lm_loss"] - 0.3
    for a, b in zip(one, tp2):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_no_save_optim_with_zero3_is_refused_before_training(tiny, tmp_path):
    proc = run_cli("train.py", tiny(no_save_optim=True, pipe_parallel_size=0, zero_optimization={"stage": 3}))
    assert proc.returncode == 2
    assert ("error: no_save_optim with ZeRO stage 3 would save no weights (ZeRO 3 keeps them only in its optimizer "
            "shards); use ZeRO stage 1 or 2, or drop no_save_optim") in proc.stderr
    assert not (tmp_path / "run" / "logs").exists()


def test_eod_mask_loss_reaches_the_engine(tiny, tmp_path):
    """Documents of 20-60 tokens (the char tokenizer's eod 256 after each): about one position in
    40 predicts across a document boundary. Masking them changes the trained losses, not the
    scale of the loss (both start near ln(257) = 5.55)."""
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    prefix = str(tmp_path / "short_text_document")
    rng = np.random.default_rng(0)
    builder = MMapIndexedDatasetBuilder(prefix, np.uint16)
    for n in rng.integers(20, 60, size=400):
        builder.add_document([*rng.integers(97, 123, size=n).tolist(), 256])
    builder.finalize()
    kw = dict(data_path=prefix, split="100,0,0", train_iters=2, eval_interval=100, checkpoint_factor=None, save=None)
    for name, masked in (("masked", True), ("plain", False)):
        proc = run_cli("train.py", tiny(name, eod_mask_loss=masked, **kw))
        assert proc.returncode == 0, proc.stderr[-3000:]
    masked, plain = (metrics(tmp_path / name / "logs") for name in ("masked", "plain"))
    for a, b in zip(masked, plain):
        assert abs(a["lm_loss"] - b["lm_loss"]) > 1e-4 and abs(a["lm_loss"] - math.log(257)) < 0.3
