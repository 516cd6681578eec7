"""What the parallel layouts cost: the same model and global batch at TP1, TP2, PP2 and DP2.

    python benchmarks/bench_layouts.py [--quick] [--steps 5] [--warmup 3] [--layouts TP1,TP2,PP2,DP2]
                                       [--keep DIR] [--json FILE]

One invocation builds a char-level dataset in a temp dir (stdlib sources, written with
MMapIndexedDatasetBuilder), then launches every layout as `deepy.py` would: DeepSpeed's launcher
with `--num_gpus N` and `cores // N` OpenMP threads per rank, each rank running
`benchmarks/layout_worker.py`, which builds the engine with the framework's own
`worker_config` / `build_run` and feeds it from `loader.micro_batches`. Model: 4 layers, hidden
256, 8 heads, seq 256, global batch 8 sequences, fp32, ZeRO 1, the pipeline engine (the
framework's default) in every layout. The layouts run one after another in the same invocation,
so TP1 is the reference measured next to the others. TP1/1T is TP1 on one thread: the per-core
reference, since on a CPU a core plays the part of one process's device (ideal per-process ratio
to it: 1.0 for TP2 and DP2).

Per layout it prints tokens/s (total and per process, from the fastest timed step; a step lasts
as long as its slowest rank; the median step is shown too), the per-process ratios to TP1 and
TP1/1T, and the share of step time spent in communication: a few more steps under torch.profiler
on every rank, the union of the collective / p2p events' intervals divided by the wall time of
those steps (mean over ranks, and the largest rank). Waiting for a peer inside a collective
counts as communication: that is the overhead a layout adds (e.g. the pipeline bubble).
Losses are compared with TP1's to show that every layout trains the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.data.corpora import write_char_dataset  # noqa: E402

CORES = os.cpu_count() or 1
MODEL = {
    "num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "seq_length": 256,
    "rotary_pct": 0.25, "gpt_j_residual": True, "no_weight_tying": True,
    "tokenizer_type": "CharLevelTokenizer", "split": "98,2,0",
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,  # global batch 8
    "zero_optimization": {"stage": 1},
    "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "min_lr": 0.0001, "warmup": 0.1, "log_interval": 1000, "eval_interval": 100000, "eval_iters": 0,
    "seed": 1234,
}
# name -> (processes, overrides, OpenMP threads per process; None: cores // processes as the
# framework's launcher sets). The global batch stays 8: DP2 halves the accumulation steps.
# TP1/1T is one process on one core: the per-core reference (one core = one "device"), which
# does not depend on how well two OpenMP threads share cores that other jobs also use.
LAYOUTS: dict[str, tuple[int, dict, int | None]] = {
    "TP1": (1, {}, None),
    "TP1/1T": (1, {}, 1),
    "TP2": (2, {"model_parallel_size": 2}, None),
    "PP2": (2, {"pipe_parallel_size": 2}, None),
    "DP2": (2, {"gradient_accumulation_steps": 2}, None),
}


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(limit: float, max_wait: float) -> None:
    """Other jobs share these cores: wait (a bounded time) for the 1-minute load to drop."""
    deadline = time.monotonic() + max_wait
    while load1() > limit and time.monotonic() < deadline:
        print(f"load {load1():.2f} > {limit}: waiting ({deadline - time.monotonic():.0f} s left)", flush=True)
        time.sleep(min(15.0, max(1.0, deadline - time.monotonic())))
    state = "ok" if load1() <= limit else "still high, measuring anyway"
    print(f"load before measuring: {load1():.2f} ({state})", flush=True)


def build_dataset(tmp: Path) -> str:
    """Char-level tokens of the stdlib's json and email packages (about 0.3M tokens)."""
    return write_char_dataset(str(tmp / "chars_text_document"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(name: str, tmp: Path, data: str, args: argparse.Namespace) -> list[dict]:
    """Launch one layout through DeepSpeed's launcher; returns the per-rank results."""
    procs, overrides, threads = LAYOUTS[name]
    tp = overrides.get("model_parallel_size", 1)
    cfg = {**MODEL, **overrides, "data_path": data, "num_gpus": procs,
           # The same padded vocabulary (512 rows) at every TP size, so the model is the same.
           "make_vocab_size_divisible_by": 512 // tp,
           "train_iters": args.warmup + args.steps + args.profile_steps}
    slug = name.replace("/", "_")
    out = tmp / slug
    out.mkdir()
    cfg_path = tmp / f"{slug}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port", str(port),
           str(ROOT / "benchmarks" / "layout_worker.py"), "--out", str(out), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--profile-steps", str(args.profile_steps), str(cfg_path)]
    # As megatron/launcher/launch.py: DeepSpeed's launcher sets no thread count, and ranks that
    # oversubscribe the cores run several times slower.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, CORES // procs)), PYTHONPATH=str(ROOT),
               PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    log = tmp / f"{slug}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        # Its own session, so that on a timeout the launcher AND the ranks it spawned are ended.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait()
    results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if rc != 0 or len(results) != procs:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{name}: exit code {rc}, {len(results)}/{procs} rank results; log tail:\n{tail}")
    print(f"[{name}] {procs} process(es), {time.perf_counter() - start:.0f} s in all "
          f"(engine built in {max(r['setup_s'] for r in results):.0f} s), "
          f"load {load1():.2f}", flush=True)
    return results


def summarize(name: str, ranks: list[dict], steps: int) -> dict:
    procs = len(ranks)
    # A step ends when its slowest rank ends. Every step does the same work and other jobs on the
    # shared cores can only add time, so the fastest step is the layout's own cost (timeit's
    # rule); a two-thread rank stalled by another job varies 10x between steps. --json has the
    # median and mean too.
    per_step = sorted(max(r["step_s"][i] for r in ranks) for i in range(steps))
    step = per_step[0]
    total = ranks[0]["tokens_per_step"] / step
    wall = max(r["timed_wall_s"] for r in ranks)  # barrier to barrier: the same window on all ranks
    shares = [r["comm_s"] / r["profiled_wall_s"] for r in ranks]
    per_op: dict[str, float] = {}
    for r in ranks:
        for op, s in r["comm_per_op_s"].items():
            per_op[op] = per_op.get(op, 0.0) + s / r["profiled_wall_s"] / procs
    return {"layout": name, "processes": procs, "threads": ranks[0]["omp_threads"], "tokens_s": total,
            "tokens_s_proc": total / procs, "step_ms": 1000 * step, "mean_step_ms": 1000 * wall / steps,
            "median_step_ms": 1000 * float(np.median(per_step)), "max_step_ms": 1000 * per_step[-1],
            "profiled_step_ms": 1000 * max(r["profiled_wall_s"] / r["profiled_steps"] for r in ranks),
            "comm_ms_per_step": 1000 * sum(r["comm_s"] / r["profiled_steps"] for r in ranks) / procs,
            "comm_share": sum(shares) / procs, "comm_share_max": max(shares),
            "per_op": per_op, "losses": ranks[0]["losses"]}


def print_table(rows: list[dict]) -> None:
    by_name = {r["layout"]: r for r in rows}
    ref = by_name.get("TP1", rows[0])
    core = by_name.get("TP1/1T")

    def ratio(r: dict, base: dict | None) -> str:
        return "-" if base is None else f"{r['tokens_s_proc'] / base['tokens_s_proc']:.2f}"

    head = (f"{'layout':7s} {'procs':>5s} {'thr/proc':>8s} {'ms/step':>8s} {'(median)':>8s} {'tokens/s':>9s} "
            f"{'tok/s/proc':>10s} {'/proc vs ' + ref['layout']:>13s} {'/proc vs TP1/1T':>15s} "
            f"{'comm share':>10s} {'(max rank)':>10s} {'loss vs ' + ref['layout']:>12s}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
        print(f"{r['layout']:7s} {r['processes']:5d} {r['threads']:>8s} {r['step_ms']:8.0f} "
              f"{r['median_step_ms']:8.0f} {r['tokens_s']:9,.0f} {r['tokens_s_proc']:10,.0f} "
              f"{ratio(r, ref):>13s} {ratio(r, core):>15s} {100 * r['comm_share']:9.1f}% "
              f"{100 * r['comm_share_max']:9.1f}% {diff:12.1e}")
    print("\ncommunication per rank and step, and by event (share of profiled step time, mean over ranks;"
          "\nevents nest, so they overlap; the comm share counts their union):")
    for r in rows:
        top = sorted(r["per_op"].items(), key=lambda kv: -kv[1])[:5]
        print(f"  {r['layout']:7s} {r['comm_ms_per_step']:5.0f} ms/step of {r['profiled_step_ms']:5.0f}: "
              + (", ".join(f"{op} {100 * s:.1f}%" for op, s in top) or "none"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps under torch.profiler, after the timed ones")
    parser.add_argument("--quick", action="store_true", help="1 warmup, 2 timed, 1 profiled step")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ",".join(LAYOUTS))
    parser.add_argument("--load-limit", type=float, default=1.5, help="wait while the 1-minute load is above this")
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for the load at most")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per layout before giving up")
    parser.add_argument("--keep", help="work in this (empty) directory and keep it: launcher logs, rank JSON")
    parser.add_argument("--json", help="also write the summary rows to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.profile_steps = 1, 2, 1
    names = [n.strip().upper() for n in args.layouts.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")

    print(f"model: 4 layers, hidden 256, 8 heads, seq 256, global batch 8, fp32, ZeRO 1; {CORES} cores; "
          f"{args.warmup} warmup + {args.steps} timed + {args.profile_steps} profiled steps per layout", flush=True)
    wait_for_quiet(args.load_limit, args.max_wait)
    start, load_start = time.perf_counter(), load1()
    with tempfile.TemporaryDirectory(prefix="bench_layouts_") as tmp_name:
        tmp = Path(args.keep or tmp_name)  # --keep: logs and per-rank JSON stay for inspection
        tmp.mkdir(parents=True, exist_ok=True)
        data = build_dataset(tmp)
        rows = [summarize(n, run_layout(n, tmp, data, args), args.steps) for n in names]
    print_table(rows)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {time.perf_counter() - start:.0f} s in all, "
          f"1-minute load {load_start:.2f} at start and {load1():.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
