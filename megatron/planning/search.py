"""`--search`: every layout of the model on the same GPUs that fits, ranked by predicted step time.

The global batch (sequences per step) and the sequence length stay as configured: a layout
changes how the work is split, not what is trained. What varies: tensor parallelism (powers of
two within a node that divide the attention and key/value heads), pipeline stages (at most one
layer each), micro-batch size (the global batch must split into whole micro-batches per
data-parallel rank), the ZeRO stage (2 and 3 only without a pipeline, which DeepSpeed's pipeline
engine refuses) and activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.planning.cluster import Cluster
from megatron.planning.memory import Layout, MemoryPlan, ModelShape, memory_plan
from megatron.planning.step_time import Kernels, StepTime, step_time

# Share of device memory kept free for the allocator's fragmentation, the CUDA context and
# library workspaces (NCCL, cuBLAS): a plan fits when it needs at most the rest.
RESERVE = 0.10


def fits(mem: MemoryPlan, cluster: Cluster) -> bool:
    return mem.total <= usable_bytes(cluster)


def usable_bytes(cluster: Cluster) -> int:
    return int(cluster.memory_bytes * (1 - RESERVE))


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryPlan
    time: StepTime


def layouts(shape: ModelShape, base: Layout, world: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of `world` devices that trains base's global batch (see the module docstring)."""
    batch = base.micro_batch * base.grad_accum * base.dp
    out = []
    tp = 1
    while tp <= min(gpus_per_node, world):
        if shape.heads % tp == 0 and shape.kv_heads % tp == 0:
            for pp in range(1, shape.num_layers + 1):
                if world % (tp * pp):
                    continue
                dp = world // (tp * pp)
                for b in (1, 2, 4, 8, 16, 32):
                    if batch % (b * dp):
                        continue
                    for zero in ((1,) if pp > 1 else (1, 2, 3)):
                        for ckpt in (True, False):
                            out.append(base.with_(tp=tp, pp=pp, dp=dp, micro_batch=b, grad_accum=batch // (b * dp),
                                                  zero_stage=zero, checkpoint=ckpt,
                                                  sequence_parallel=base.sequence_parallel and tp > 1))
        tp *= 2
    return out


def search(shape: ModelShape, base: Layout, cluster: Cluster, kernels: Kernels = Kernels()) -> list[Candidate]:
    """The layouts that fit on `cluster`, fastest first."""
    found = []
    for lay in layouts(shape, base, base.world, cluster.gpus_per_node):
        mem = memory_plan(shape, lay)
        if fits(mem, cluster):
            found.append(Candidate(lay, mem, step_time(shape, lay, cluster, kernels)))
    return sorted(found, key=lambda c: c.time.total)


def table(found: list[Candidate], base: Layout, cluster: Cluster, limit: int = 15) -> str:
    """The ranking as text: the first `limit` rows and the configured layout's row."""
    world = base.world
    head = (f"{'rank':>4} {'TP':>3} {'PP':>3} {'DP':>4} {'micro':>5} {'accum':>5} {'ZeRO':>4} {'ckpt':>4} "
            f"{'s/step':>8} {'TFLOPS':>7} {'MFU':>6} {'GiB/GPU':>8}")
    lines = [head]

    def row(i: int, c: Candidate) -> str:
        lay, t = c.layout, c.time
        tfl = t.hardware_flops / t.total / world / 1e12
        mfu = t.model_flops / t.total / world / cluster.peak_flops
        mark = "  <- configured" if _same(lay, base) else ""
        return (f"{i:>4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.micro_batch:>5} {lay.grad_accum:>5} "
                f"{lay.zero_stage:>4} {'on' if lay.checkpoint else 'off':>4} {t.total:>8.2f} {tfl:>7.1f} "
                f"{100 * mfu:>5.1f}% {c.memory.total / 2**30:>8.2f}{mark}")

    shown = False
    for i, c in enumerate(found[:limit], 1):
        lines.append(row(i, c))
        shown |= _same(c.layout, base)
    if not shown:
        for i, c in enumerate(found, 1):
            if _same(c.layout, base):
                lines += ["   ...", row(i, c)]
                break
        else:
            lines.append("   (the configured layout does not fit)")
    lines.append(f"{len(found)} layouts fit")
    return "\n".join(lines)


def _same(a: Layout, b: Layout) -> bool:
    return (a.tp, a.pp, a.dp, a.micro_batch, a.zero_stage, a.checkpoint) == (
        b.tp, b.pp, b.dp, b.micro_batch, b.zero_stage, b.checkpoint)
