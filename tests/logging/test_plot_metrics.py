"""tools/plot_metrics.py: PNG from a metrics.jsonl, exit status 2 on bad input."""

import json
import os
import subprocess
import sys

from megatron.logging import MetricsLogger

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "plot_metrics.py")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_tool(*args):
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )


def write_run(log_dir):
    with MetricsLogger(str(log_dir), None, False, None, None, {}, enabled=True) as logger:
        for it in range(10, 210, 10):
            logger.log_train(it, {
                "lm_loss": 10.0 / (1 + it / 50), "lr": 1e-4 * min(1.0, it / 50),
                "grad_norm": 5.0 / (1 + it / 100), "tokens_per_sec": 10000.0 + it,
            })
            if it % 50 == 0:
                logger.log_eval(it, {"lm_loss": 10.5 / (1 + it / 50)})


def test_plot_from_log_dir_default_output(tmp_path):
    write_run(tmp_path / "run1")
    # A torn last line (run killed mid-write) is skipped, not fatal.
    with open(tmp_path / "run1" / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "itera')
    result = run_tool(str(tmp_path / "run1"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run1" / "metrics.png"
    assert result.stdout.strip() == str(out)
    assert "skipping malformed line 25" in result.stderr  # 20 train + 4 eval records, then the torn one
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000


def test_plot_jsonl_with_explicit_output_and_sparse_metrics(tmp_path):
    # Only loss is logged: the lr / grad norm / tokens/s panels are left out.
    path = tmp_path / "m.jsonl"
    path.write_text("".join(
        json.dumps({"type": "train", "iteration": i, "lm_loss": 5.0 - i / 10, "time": 0.0}) + "\n"
        for i in range(1, 11)
    ))
    out = tmp_path / "plots" / "loss.png"
    out.parent.mkdir()
    result = run_tool(str(path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000


def test_missing_file_and_no_train_records_exit_2(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_tool(str(missing))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: metrics file not found: {missing}"

    only_eval = tmp_path / "eval.jsonl"
    only_eval.write_text(json.dumps({"type": "eval", "iteration": 5, "lm_loss": 2.0}) + "\n")
    result = run_tool(str(only_eval))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no train records in {only_eval}"
    assert not (tmp_path / "metrics.png").exists()


def test_resumed_run_later_records_win(tmp_path):
    # A run logged 10..30, crashed, resumed from its iteration-20 checkpoint and logged
    # 30 again: the plotted history is the one the final model has.
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = tmp_path / "metrics.jsonl"
    rows = [(10, 5.0), (20, 4.0), (30, 3.0), (30, 3.5), (40, 3.25)]
    path.write_text("".join(
        json.dumps({"type": "train", "iteration": i, "lm_loss": loss, "grad_norm": "NaN"}) + "\n"
        for i, loss in rows
    ))
    records = tool.load_records(str(path))
    assert tool._series(records["train"], "lm_loss") == ([10, 20, 30, 40], [5.0, 4.0, 3.5, 3.25])
    assert tool._series(records["train"], "grad_norm") == ([], [])  # non-finite points are not drawn
    assert tool.resolve_metrics_path(str(tmp_path)) == str(path)
