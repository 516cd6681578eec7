"""Preemption: time from a SIGTERM to deepy.py until the job has exited with its checkpoint
written, against a normal checkpoint save of the same model in the same run.

    python benchmarks/bench_preemption.py [--layers 4] [--hidden 512] [--ranks 2] [--rounds 5]

Each round launches `deepy.py train.py` (TP1 x DP`ranks`, fp32, Adam) with checkpoint_factor 4,
waits for the normal save at iteration 4 (its duration is logged as `saved checkpoint ... in X s`),
lets two more iterations run, sends SIGTERM to deepy.py and measures until deepy.py exits. The
signal-to-exit time is the rest of the step under way, the ranks' agreement, the save and the
shutdown; its floor is the normal save. Prints medians and the ratio. Timings need a quiet
machine (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SAVED = re.compile(r"saved checkpoint \S+global_step(\d+) in ([\d.]+) s")


def one_round(cfg: str) -> tuple[float, float, float, float, int]:
    """(normal save s, preemption save s, signal to `saved` line s, signal-to-exit s, checkpoint bytes)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "deepy.py", "train.py", cfg], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    normal = None
    for line in proc.stdout:
        lines.append(line)
        found = SAVED.search(line)
        if found and normal is None:
            normal = float(found.group(2))
        if normal is not None and re.match(r"\s*iteration\s+6/", line):
            break
    signalled = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    saved_at, rest = None, []
    for line in proc.stdout:
        rest.append(line)
        if saved_at is None and SAVED.search(line):
            saved_at = time.perf_counter() - signalled
    proc.wait()
    elapsed = time.perf_counter() - signalled
    assert proc.returncode == 0 and saved_at is not None, "".join(lines + rest)[-3000:]
    step, preempt = SAVED.findall("".join(rest))[-1]
    ckpt = Path(cfg).with_suffix("") / "ckpt" / f"global_step{step}"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    return normal, float(preempt), saved_at, elapsed, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from helpers import tiny_config
    from megatron.data.corpora import write_char_dataset

    with tempfile.TemporaryDirectory(prefix="bench_preempt_") as tmp:
        data = write_char_dataset(str(Path(tmp) / "chars_text_document"))
        results = []
        for r in range(args.rounds):
            cfg = tiny_config(Path(tmp), data, f"r{r}", num_layers=args.layers, hidden_size=args.hidden,
                              num_attention_heads=8, num_gpus=args.ranks, train_iters=100000, eval_interval=100000,
                              checkpoint_factor=4, log_interval=1, gradient_accumulation_steps=1)
            results.append(one_round(cfg))
            normal, preempt, saved_at, elapsed, size = results[-1]
            print(f"round {r}: normal save {normal:.2f} s, preemption save {preempt:.2f} s, signal to saved "
                  f"{saved_at:.2f} s, signal to exit {elapsed:.2f} s ({size / 1e6:.0f} MB checkpoint)", flush=True)
    normal, preempt, saved_at, elapsed = (statistics.median(x[i] for x in results) for i in range(4))
    print(f"median over {args.rounds} rounds: normal save {normal:.2f} s | preemption save {preempt:.2f} s | "
          f"signal to saved {saved_at:.2f} s | signal to exit {elapsed:.2f} s | "
          f"signal-to-exit / normal save {elapsed / normal:.2f}x")


if __name__ == "__main__":
    main()
