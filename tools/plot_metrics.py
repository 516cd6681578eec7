"""Plot a run's metrics.jsonl (written by megatron.logging.MetricsLogger) to a PNG.

    python tools/plot_metrics.py LOG_DIR_or_metrics.jsonl [-o out.png]

Panels: train and validation loss, learning rate, grad norm, tokens/s, and the eval_tasks'
accuracies and perplexities; a panel whose metric never appears is left out. When a resumed
run logged an iteration again, the record written last wins, so the curve shows the history
the final model actually has.
Exit status 2 when the file is missing or holds no train records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

# (panel title, [(record type, metric key, legend label)], log-scale y)
_PANELS: list[tuple[str, list[tuple[str, str, str]], bool]] = [
    ("LM loss", [("train", "lm_loss", "train"), ("eval", "lm_loss", "validation")], False),
    ("learning rate", [("train", "lr", "lr")], False),
    ("grad norm", [("train", "grad_norm", "grad norm")], True),
    ("tokens/s", [("train", "tokens_per_sec", "tokens/s")], False),
]


class UsageError(Exception):
    """A problem with the input that the user must fix; reported with exit status 2."""


def resolve_metrics_path(path: str) -> str:
    """The metrics.jsonl inside a log directory, or the file itself."""
    return os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path


def load_records(metrics_path: str) -> dict[str, dict[int, dict]]:
    """Records by type ("train", "eval"), each keyed by iteration, later lines winning."""
    if not os.path.isfile(metrics_path):
        raise UsageError(f"metrics file not found: {metrics_path}")
    by_type: dict[str, dict[int, dict]] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a torn last line; the rest is still good.
                print(f"warning: skipping malformed line {line_number} of {metrics_path}", file=sys.stderr)
                continue
            kind, iteration = record.get("type"), record.get("iteration")
            if kind is None or iteration is None:
                continue
            by_type.setdefault(kind, {})[int(iteration)] = record
    if not by_type.get("train"):
        raise UsageError(f"no train records in {metrics_path}")
    return by_type


def _series(records: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for iteration in sorted(records):
        value = records[iteration].get(key)
        if value is None:
            continue
        value = float(value)  # also reads the "NaN"/"Infinity" strings the logger writes
        if math.isfinite(value):
            xs.append(iteration)
            ys.append(value)
    return xs, ys


def _task_panels(records: dict[int, dict]) -> list[tuple[str, list[tuple[str, str, str]], bool]]:
    """eval_tasks records: accuracies in one panel, perplexities (log scale) in another."""
    keys = sorted({k for r in records.values() for k in r if "/" in k})
    acc = [("tasks", k, k) for k in keys if k.rsplit("/", 1)[1] in ("acc", "acc_norm")]
    ppl = [("tasks", k, k) for k in keys if k.rsplit("/", 1)[1] == "perplexity"]
    return [("eval tasks: accuracy", acc, False), ("eval tasks: perplexity", ppl, True)]


def plot(by_type: dict[str, dict[int, dict]], title: str, out_path: str) -> int:
    """Draw the panels that have data into out_path; returns how many were drawn."""
    # Imported here, not at the top, so that bad input is reported without the ~2 s
    # matplotlib import.
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot's import
    import matplotlib.pyplot as plt

    panels = []
    for panel_title, lines, log_y in _PANELS + _task_panels(by_type.get("tasks", {})):
        data = []
        for kind, key, label in lines:
            xs, ys = _series(by_type.get(kind, {}), key)
            if xs:
                data.append((label, xs, ys))
        if data:
            panels.append((panel_title, data, log_y))
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.8 * rows), squeeze=False)
    for ax, (panel_title, data, log_y) in zip(axes.flat, panels):
        for label, xs, ys in data:
            sparse = label == "validation" or "/" in label  # evaluations: a marker keeps one point visible
            ax.plot(xs, ys, label=label, marker="o" if sparse else None, markersize=3)
        ax.set_title(panel_title)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if log_y and all(y > 0 for _, _, ys in data for y in ys):
            ax.set_yscale("log")
        if len(data) > 1:
            ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return len(panels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a log directory holding metrics.jsonl, or the jsonl file")
    parser.add_argument("-o", "--output", help="PNG to write (default: metrics.png beside the jsonl)")
    args = parser.parse_args(argv)
    metrics_path = resolve_metrics_path(args.path)
    try:
        by_type = load_records(metrics_path)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = os.path.dirname(os.path.abspath(metrics_path))
    out_path = args.output or os.path.join(run_dir, "metrics.png")
    plot(by_type, run_dir, out_path)
    print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
