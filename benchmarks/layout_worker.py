"""One rank of a parallel-layout benchmark run, started by DeepSpeed's launcher from
`benchmarks/bench_layouts.py` (the way `deepy.py` starts `train.py`):

    python -m deepspeed.launcher.runner --num_gpus N --master_port P \
        benchmarks/layout_worker.py --out DIR [--warmup 3 --steps 5 --profile-steps 2] CONFIG.yml

The engine is built by the framework itself (`worker_config` + `build_run`, data from
`loader.micro_batches`), so what is timed is exactly a training step of `train.py`. Each rank
writes `DIR/rank{R}.json`: its timed-step wall times, the losses, and the communication time of a
few extra steps run under `torch.profiler` (CPU activities).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron.data.loader import micro_batches  # noqa: E402
from megatron.training.setup import build_run, worker_config  # noqa: E402

# Profiler event names of communication on torch 2.13 (checked on the CPU build with gloo): the
# dispatcher op on the calling thread ("c10d::allreduce_", "c10d::send", "c10d::recv_",
# "c10d::barrier", ...) and the backend's own event ("gloo:all_reduce", "gloo:all_gather",
# "gloo:broadcast", "gloo:send", "gloo:recv", "gloo:barrier"). gloo runs collectives on its worker
# threads and only the backend event spans the transfer (including waiting for the peer), while
# the caller blocks in Work.wait(), which records no event; so both kinds are collected and their
# intervals merged across threads, which also removes the double count of nested events.
COMM_PREFIXES = ("c10d::", "gloo:", "nccl:", "mpi:")


def is_comm(name: str) -> bool:
    return name.startswith(COMM_PREFIXES)


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (microseconds)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def comm_profile(events: Any) -> dict[str, Any]:
    """Communication time of the profiled steps: merged total and a per-op breakdown."""
    spans, per_op = [], defaultdict(float)
    for e in events:
        if is_comm(e.name):
            spans.append((e.time_range.start, e.time_range.end))
            per_op[e.name] += e.time_range.end - e.time_range.start
    return {"comm_us": union_us(spans), "per_op_us": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="directory for rank{R}.json")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by DeepSpeed's launcher
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args(argv)

    t_setup = time.perf_counter()
    cfg, _ = worker_config(args.configs)
    run = build_run(cfg)
    setup_s = time.perf_counter() - t_setup
    d = cfg.derived
    data = micro_batches(run.train, 0, d.micro_batch_size, d.data_parallel_size, run.dp_rank)
    step = run.stepper.train_batch
    rank = dist.get_rank()
    try:
        for _ in range(args.warmup):
            step(data)
        # Ranks start and stop the timed window together, so every rank times the same steps.
        dist.barrier()
        times, losses = [], []
        start = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step(data))
            times.append(time.perf_counter() - t0)
        dist.barrier()
        wall = time.perf_counter() - start

        # Profiled steps come after the timed ones: the profiler slows every op a little, so it
        # must not touch the throughput numbers; the share is taken within the profiled steps.
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            p0 = time.perf_counter()
            for _ in range(args.profile_steps):
                losses.append(step(data))
            profiled_s = time.perf_counter() - p0
        comm = comm_profile(prof.events())
        result = {
            "rank": rank, "world_size": dist.get_world_size(),
            "coords": {"pipe": run.stepper.groups.pp_rank, "data": run.dp_rank, "model": run.stepper.groups.tp_rank},
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "setup_s": setup_s,
            "tokens_per_step": d.train_batch_size * cfg.model.seq_length,
            "step_s": times, "timed_wall_s": wall, "losses": losses,
            "profiled_steps": args.profile_steps, "profiled_wall_s": profiled_s,
            "comm_s": comm["comm_us"] / 1e6,
            "comm_per_op_s": {k: v / 1e6 for k, v in comm["per_op_us"].items()},
        }
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f, indent=1)
    finally:
        run.logger.close()
        # Every rank ends at a barrier before tearing down (avoids gloo's abort at exit).
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
