#!/usr/bin/env python
"""The planner's step time for a CPU config against the measured step time of the same config.

    python benchmarks/bench_planner_cpu.py [--steps 3] [--threads 1]

The config is a small GPT (6 layers, hidden 512, sequence 512, micro-batch 4 x 2 accumulation
steps, fp32) trained in this process by megatron/planning/measure.py: the framework's layer list,
torch's Adam, random tokens. One process on `--threads` cores is one "device" of
configs/clusters/cpu.yml, whose per-core figures are scaled by the thread count. Prints the
predicted and measured seconds per step (the fastest of `--steps` timed steps), their ratio, and
the predicted split. A timing, so not a test: run it on a quiet machine (check `uptime`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.config import load_config  # noqa: E402
from megatron.planning.cluster import load_cluster  # noqa: E402
from megatron.planning.measure import measure  # noqa: E402
from megatron.planning.memory import plan_config  # noqa: E402
from megatron.planning.step_time import step_time, throughput  # noqa: E402

CONFIG = {
    "num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "seq_length": 512, "vocab_size": 2048,
    "pos_emb": "rotary", "rotary_pct": 0.25, "gpt_j_residual": True, "no_weight_tying": True,
    "pipe_parallel_size": 0, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
    "train_iters": 100, "precision": "fp32", "checkpoint_activations": False,
    "optimizer": {"type": "Adam", "params": {"lr": 1.0e-4}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (cores) of the one process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cpu.yml"
        path.write_text(yaml.safe_dump(CONFIG))
        cfg = load_config([str(path)], require_files=False)
    cpu = load_cluster(ROOT / "configs" / "clusters" / "cpu.yml")
    # One process on n cores: n cores' compute and memory bandwidth.
    device = dataclasses.replace(cpu, peak_tflops=cpu.peak_tflops * args.threads,
                                 hbm_bandwidth_gbs=cpu.hbm_bandwidth_gbs * args.threads)
    shape, lay, mem = plan_config(cfg)
    st = step_time(shape, lay, device)
    tput = throughput(st, 1, device)
    got = measure(cfg, timed_steps=args.steps)
    print(f"config: {CONFIG['num_layers']} layers, hidden {CONFIG['hidden_size']}, seq {CONFIG['seq_length']}, "
          f"micro-batch {lay.micro_batch} x {lay.grad_accum}, fp32, {args.threads} thread(s), "
          f"peak {device.peak_tflops * 1e3:.0f} GFLOP/s (configs/clusters/cpu.yml)")
    print(f"predicted: {st.total:.3f} s per step (compute {st.compute:.3f}, optimizer {st.optimizer:.3f}), "
          f"{tput.tflops_per_gpu * 1e3:.1f} GFLOP/s, MFU {100 * tput.mfu:.1f}%")
    print(f"measured:  {got.step_seconds:.3f} s per step (fastest of {args.steps}), "
          f"{st.hardware_flops / got.step_seconds / 1e9:.1f} GFLOP/s")
    print(f"ratio predicted / measured: {st.total / got.step_seconds:.2f}")
    print(f"memory: estimated {mem.total / 2**20:.1f} MiB, measured peak {got.peak_bytes / 2**20:.1f} MiB "
          f"(ratio {mem.total / got.peak_bytes:.3f})")


if __name__ == "__main__":
    main()
