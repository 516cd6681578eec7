"""MetricsLogger: console line, metrics.jsonl, TensorBoard and wandb backends."""

import glob
import json
import math
import os
import sys
import time
import types

import pytest
import torch

from megatron.logging import MetricsLogger

FULL_TRAIN = {
    "lm_loss": 7.1234,
    "lr": 1e-4,
    "grad_norm": 1.2341,
    "loss_scale": 4096.0,
    "skipped_iters": 0,
    "tokens_per_sec": 12345.4,
    "ms_per_iter": 123.44,
    "tflops": 0.1234,
    "mfu": 0.1234,
}


def make_logger(tmp_path, enabled=True, tensorboard=False, train_iters=200):
    return MetricsLogger(
        log_dir=str(tmp_path / "logs"),
        tensorboard_dir=str(tmp_path / "tb") if tensorboard else None,
        use_wandb=False,
        wandb_project=None,
        wandb_group=None,
        run_config={"hidden_size": 64},
        enabled=enabled,
        train_iters=train_iters,
    )


def read_jsonl(path):
    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=reject) for line in f]


def test_train_line_format(tmp_path, capsys):
    with make_logger(tmp_path) as logger:
        line = logger.log_train(10, FULL_TRAIN)
    assert line == (
        " iteration       10/     200 | lm loss 7.1234E+00 | lr 1.000E-04 | grad norm 1.234 |"
        " loss scale 4096.0 | skipped 0 | tokens/s 12,345 | ms/iter 123.4 | TFLOPS 0.12 |"
        " MFU 12.3% |"
    )
    assert capsys.readouterr().out == line + "\n"


def test_partial_unknown_and_nonfinite_keys(tmp_path):
    with make_logger(tmp_path, train_iters=None) as logger:
        # Missing keys are left out, known keys keep their order whatever the dict order,
        # unknown keys follow, tensors are accepted.
        line = logger.log_train(
            3, {"consumed_samples": 96, "lr": torch.tensor(2.5e-5), "lm_loss": 3.0, "grad_norm": math.inf}
        )
    assert line == " iteration        3 | lm loss 3.0000E+00 | lr 2.500E-05 | grad norm inf | consumed samples 96 |"


def test_eval_line_and_perplexity(tmp_path):
    with make_logger(tmp_path) as logger:
        line = logger.log_eval(100, {"lm_loss": 3.2})
        capped = logger.log_eval(101, {"lm_loss": 50.0})
        test = logger.log_eval(102, {"lm_loss": 2.0}, "test")
    assert line == " validation loss at iteration      100 | lm loss 3.2000E+00 | PPL 2.4533E+01 |"
    assert test == " test loss at iteration      102 | lm loss 2.0000E+00 | PPL 7.3891E+00 |"
    records = [json.loads(r) for r in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["iteration"], r["lm_loss"]) for r in records] == [
        ("eval", 100, 3.2), ("eval", 101, 50.0), ("test", 102, 2.0)]
    # exp is capped at exp(20) = 4.85e8 so an untrained model does not print inf.
    assert capped == " validation loss at iteration      101 | lm loss 5.0000E+01 | PPL 4.8517E+08 |"


def test_task_line_and_records(tmp_path):
    with make_logger(tmp_path) as logger:
        line = logger.log_tasks(200, {"lambada_openai/perplexity": 41.234, "lambada_openai/acc": 0.3125,
                                      "piqa/acc": 0.6})
    assert line == (" eval tasks at iteration      200 | lambada_openai/perplexity 41.23 | lambada_openai/acc 0.3125 |"
                    " piqa/acc 0.6 |")
    [record] = [json.loads(r) for r in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert (record["type"], record["iteration"], record["piqa/acc"], record["lambada_openai/acc"]) == \
        ("tasks", 200, 0.6, 0.3125)


def test_jsonl_records_and_resume_appends(tmp_path):
    start = time.time()
    with make_logger(tmp_path) as logger:
        logger.log_train(10, FULL_TRAIN)
        logger.log_eval(10, {"lm_loss": 2.0})
    # A resumed run opens the same file again: the history stays, new records follow.
    with make_logger(tmp_path) as logger:
        logger.log_train(20, {"lm_loss": math.nan, "grad_norm": -math.inf, "skipped_iters": 1})
    end = time.time()

    records = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert len(records) == 3
    times = [record.pop("time") for record in records]
    assert start <= times[0] <= times[1] <= times[2] <= end
    assert records[0] == {"type": "train", "iteration": 10, **FULL_TRAIN}
    assert isinstance(records[0]["skipped_iters"], int)
    assert records[1] == {"type": "eval", "iteration": 10, "lm_loss": 2.0, "lm_loss_ppl": math.exp(2.0)}
    # Strict JSON: non-finite values are strings that float() reads back.
    assert records[2] == {
        "type": "train", "iteration": 20, "lm_loss": "NaN", "grad_norm": "-Infinity", "skipped_iters": 1,
    }
    assert float(records[2]["grad_norm"]) == -math.inf


def test_each_record_is_on_disk_before_close(tmp_path):
    logger = make_logger(tmp_path)
    logger.log_train(1, {"lm_loss": 4.0})
    # Another process (a live plot, a tail -f) must see the line while the run goes on.
    assert len(read_jsonl(tmp_path / "logs" / "metrics.jsonl")) == 1
    logger.close()
    logger.close()  # closing twice is harmless


def test_disabled_logger_writes_and_prints_nothing(tmp_path, capsys):
    logger = make_logger(tmp_path, enabled=False, tensorboard=True)
    line = logger.log_train(5, {"lm_loss": 1.5})
    logger.log_eval(5, {"lm_loss": 1.5})
    logger.close()
    assert line == " iteration        5/     200 | lm loss 1.5000E+00 |"
    assert capsys.readouterr().out == ""
    assert os.listdir(tmp_path) == []


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with make_logger(tmp_path, tensorboard=True) as logger:
        logger.log_train(10, {"lm_loss": 7.5, "lr": 1e-4})
        logger.log_train(20, {"lm_loss": 6.25, "lr": 2e-4})
        logger.log_eval(20, {"lm_loss": 6.5})
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert set(scalars) == {"train/lm_loss", "train/lr", "eval/lm_loss", "eval/lm_loss_ppl"}
    assert [(e.step, e.value) for e in events.Scalars("train/lm_loss")] == [(10, 7.5), (20, 6.25)]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-4, 2e-4], rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("eval/lm_loss")] == [(20, 6.5)]
    assert events.Scalars("eval/lm_loss_ppl")[0].value == pytest.approx(math.exp(6.5), rel=1e-6)


def test_wandb_offline_run(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # anything wandb writes relative to cwd stays in tmp_path

    logger = MetricsLogger(
        log_dir=str(tmp_path / "logs"), tensorboard_dir=None, use_wandb=True,
        wandb_project="neox-test", wandb_group="group-a", run_config={"hidden_size": 64},
        enabled=True, wandb_team="team-x", wandb_host="https://wandb.example.org", wandb_run_name="pythia-run-7",
    )
    assert wandb.run is not None and wandb.run.project == "neox-test"
    assert wandb.run.config["hidden_size"] == 64
    # wandb_team is the entity, wandb_run_name the name, wandb_host the server
    assert (wandb.run.entity, wandb.run.name) == ("team-x", "pythia-run-7")
    assert wandb.run.settings.base_url == "https://wandb.example.org"
    logger.log_train(1, {"lm_loss": 3.0})
    logger.log_eval(1, {"lm_loss": 2.0})
    logger.log_eval(1, {"lm_loss": 2.5}, "test")
    logger.log_tasks(1, {"piqa/acc": 0.5})
    logger.close()
    assert wandb.run is None

    # dir=log_dir wins over WANDB_DIR: the run sits beside metrics.jsonl.
    runs = glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    # The record file is protobuf in a log: strings appear verbatim. wandb 0.31's finish() can
    # return before its service process has written the records (the file then holds only its
    # 7-byte header for a moment), so wait for them.
    needles = (b"train/lm_loss", b"eval/lm_loss_ppl", b"test/lm_loss", b"tasks/piqa/acc", b"hidden_size", b"group-a", b"neox-test",
               b"team-x", b"pythia-run-7")
    deadline = time.monotonic() + 30
    while True:
        data = open(runs[0], "rb").read()
        if all(n in data for n in needles) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert data.startswith(b":W&B")
    for needle in needles:
        assert needle in data


def test_wandb_missing_or_failing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(RuntimeError, match=r"`pip install wandb`"):
        MetricsLogger(None, None, True, "p", None, {}, enabled=True)

    def failing_init(**kwargs):
        raise PermissionError("api key not configured")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=failing_init))
    with pytest.raises(RuntimeError, match=r"PermissionError: api key not configured.*WANDB_MODE=offline"):
        MetricsLogger(None, None, True, "p", None, {}, enabled=True)
