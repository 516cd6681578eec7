"""Timing one training step on a shared machine: the step under test, the load other processes
put on the CPUs meanwhile, and a per-op profile. Used by bench_train_vs_hf.py."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.profiler import record_function


@dataclass
class Impl:
    """One side of the comparison: `step()` runs one full training step and returns the loss."""

    name: str
    step: Callable[[], float]
    setup_s: float = 0.0


def manual_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, tokens, labels) -> Callable[[], float]:
    def step() -> float:
        with record_function("forward+loss"):
            loss = loss_fn(model, tokens, labels)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
        with record_function("zero_grad"):
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def _cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """CPUs used by OTHER processes between construction and `cpus()` (machine busy time minus
    this process's user+system time), averaged over the interval."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _cpu_busy_seconds(), self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def cpus(self) -> float:
        wall = time.perf_counter() - self.t0
        foreign = (_cpu_busy_seconds() - self.busy0) - (self._own() - self.own0)
        return max(foreign, 0.0) / max(wall, 1e-9)


def wait_for_quiet(timeout_s: float, threshold: float = 0.25) -> None:
    """Wait (up to timeout_s) until other processes use less than `threshold` CPUs."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        load = ForeignLoad()
        time.sleep(0.5)
        if load.cpus() < threshold:
            return


def measured_step(impl: Impl, quiet_wait: float = 0.0) -> dict:
    """One step of `impl`, with what else the machine was doing meanwhile."""
    wait_for_quiet(quiet_wait)
    load = ForeignLoad()
    faults0, sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, os.times().system
    t0 = time.perf_counter()
    loss = impl.step()
    return dict(time=time.perf_counter() - t0, loss=loss, foreign=load.cpus(),
                faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0,
                sys=os.times().system - sys0)


def profile_impl(args, dtype_name: str, impls: list[Impl]) -> None:
    from torch.profiler import ProfilerActivity, profile

    target = next((i for i in impls if i.name == args.profile_impl), None)
    if target is None:
        print(f"--profile: no implementation {args.profile_impl!r} in this run")
        return
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.profile_shapes) as prof:
        for _ in range(args.profile):
            target.step()
    n = args.profile
    print(f"\nprofile of {target.name} [{dtype_name}], {n} step(s), times per step:")
    events = prof.key_averages(group_by_input_shape=args.profile_shapes)
    total = sum(e.self_cpu_time_total for e in events) / n
    phases = [e for e in events if e.key in ("forward+loss", "backward", "optimizer", "zero_grad")]
    for e in sorted(phases, key=lambda e: -e.cpu_time_total):
        print(f"  phase {e.key:14s} {e.cpu_time_total / n / 1e3:9.1f} ms")
    print(f"  {'op':58s} {'self ms':>9s} {'share':>6s} {'calls':>6s}")
    ops = sorted((e for e in events if e.key.startswith("aten::") or e.key.startswith("Optimizer")),
                 key=lambda e: -e.self_cpu_time_total)
    for e in ops[: args.profile_rows]:
        shape = f" {str(e.input_shapes)[:60]}" if args.profile_shapes else ""
        print(f"  {e.key[:58]:58s} {e.self_cpu_time_total / n / 1e3:9.1f} {e.self_cpu_time_total / n / total:6.1%}"
              f" {e.count // n:6d}{shape}")
    print(f"  {'total self CPU':58s} {total / 1e3:9.1f}")
