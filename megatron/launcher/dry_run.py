"""`deepy.py --dry-run`: the layout, the exact parameter count, memory per GPU by category and, on
a cluster (`--cluster FILE`), the predicted step time, throughput and cost; `--search` ranks every
layout that fits. The model is megatron/planning, documented in docs/planner.md.

With a cluster the report ends with one line scripts can read:
`predicted: T TFLOPS per GPU, MFU M%, S s per step, fits (U of C GiB)` (or `does not fit`).
"""

from __future__ import annotations

from pathlib import Path

from megatron.config import NeoXConfig
from megatron.planning.cluster import Cluster, load_cluster
from megatron.planning.memory import Layout, MemoryPlan, plan_config
from megatron.planning.search import RESERVE, fits, search, table, usable_bytes
from megatron.planning.step_time import StepTime, step_time, throughput

GiB = 2**30
CLUSTERS = Path(__file__).resolve().parents[2] / "configs" / "clusters"
# Without --cluster, fit is judged against these shipped GPU nodes.
FIT_CHECKS = ("a100-40gb.yml", "a100-80gb.yml", "h100-80gb.yml")


def _tflops(x: float) -> str:
    """One decimal for GPUs; three significant figures where a CPU's fraction of a TFLOPS would round to 0.1."""
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def _memory_lines(lay: Layout, mem: MemoryPlan) -> list[str]:
    ckpt = "on" if lay.checkpoint else "off"
    extras = []
    if lay.sequence_parallel:
        extras.append("sequence parallel")
    if lay.partition_activations:
        extras.append("partitioned activations")
    extra = (", " + ", ".join(extras)) if extras else ""
    return [
        f"memory per GPU, heaviest stage (stage {mem.stage + 1} of {lay.pp}; {lay.precision}, ZeRO-{lay.zero_stage}, "
        f"activation checkpointing {ckpt}{extra}):",
        f"  weights              {_gib(mem.weights)}",
        f"  gradients            {_gib(mem.gradients)}",
        f"  optimizer state      {_gib(mem.optimizer)}",
        f"  activations          {_gib(mem.activations)}   ({min(lay.pp - mem.stage, lay.grad_accum)} micro-batch(es) "
        f"in flight; without checkpointing: {_gib(mem.activations_no_ckpt).strip()})",
        f"  backward working set {_gib(mem.working)}   (recomputed chunk and gradients in flight)",
        f"  logits and loss      {_gib(mem.logits)}   (live at once with the working set: the larger counts)",
        f"  pipeline buffers     {_gib(mem.pipe_buffers)}   (the pipeline engine's send/receive and output buffers)",
        f"  communication buckets{_gib(mem.buckets)}" + ("" if mem.buckets_in_backward else
                                                       "   (used after the backward only: the larger of them and "
                                                       "activations + working set counts)"),
        f"  total                {_gib(mem.total)}",
    ]


def _fit_line(mem: MemoryPlan, cluster: Cluster) -> str:
    verdict = "fits" if fits(mem, cluster) else "does NOT fit"
    headroom = usable_bytes(cluster) - mem.total
    return (f"  {verdict} a {cluster.gpu} ({cluster.memory_gib:g} GiB, keeping {RESERVE:.0%} for the allocator "
            f"and libraries: headroom {headroom / GiB:.2f} GiB)")


def _time_lines(cfg: NeoXConfig, lay: Layout, mem: MemoryPlan, cluster: Cluster, st: StepTime) -> list[str]:
    tput = throughput(st, lay.world, cluster)
    nodes = -(-lay.world // cluster.gpus_per_node)
    lines = [
        f"step time on {cluster.name} ({lay.world} devices = {nodes} node(s) of {cluster.gpus_per_node}):",
        f"  compute              {st.compute:10.3f} s",
        f"  tensor parallel      {st.tensor_parallel:10.3f} s",
        f"  pipeline bubble      {st.bubble:10.3f} s",
        f"  pipeline sends       {st.pipeline_p2p:10.3f} s",
        f"  data parallel        {st.data_parallel:10.3f} s   (exposed gradient reduce and weight gather)",
        f"  optimizer            {st.optimizer:10.3f} s",
        f"  total                {st.total:10.3f} s per step",
        f"throughput: {tput.tokens_per_second:,.0f} tokens/s, {_tflops(tput.tflops_per_gpu)} TFLOPS per GPU "
        f"(recomputation counted), MFU {100 * tput.mfu:.1f}% of {cluster.peak_tflops:g} TFLOPS",
    ]
    steps = cfg.derived.train_iters
    seconds = steps * st.total
    gpu_hours = seconds / 3600 * lay.world
    cost = f", ${gpu_hours * cluster.price_per_gpu_hour:,.0f}" if cluster.price_per_gpu_hour else ""
    lines.append(f"whole run: {steps:,} steps, {steps * st.tokens:,} tokens, {seconds / 86400:,.1f} days, "
                 f"{gpu_hours:,.1f} GPU-hours{cost}")
    if cfg.derived.procs_per_node != cluster.gpus_per_node and cfg.derived.num_nodes > 1:
        lines.append(f"note: the config runs {cfg.derived.procs_per_node} processes per node, the cluster has "
                     f"{cluster.gpus_per_node} GPUs per node; the prediction places ranks as the cluster does")
    lines.append(_fit_line(mem, cluster))
    fit = "fits" if fits(mem, cluster) else "does not fit"
    lines.append(f"predicted: {_tflops(tput.tflops_per_gpu)} TFLOPS per GPU, MFU {100 * tput.mfu:.1f}%, "
                 f"{st.total:.3f} s per step, {fit} ({mem.total / GiB:.2f} of {cluster.memory_gib:g} GiB)")
    return lines


def report(cfg: NeoXConfig, cluster: Cluster | None = None, search_layouts: bool = False) -> str:
    d, p = cfg.derived, cfg.parallel
    tp, pp = p.model_parallel_size, d.pipe_stages
    procs = d.procs_per_node
    lines = [
        f"parallel layout: tensor {tp} x pipeline {pp} x data {d.data_parallel_size} = world size "
        f"{d.world_size} ({d.num_nodes} node(s) x {procs} processes)",
        f"batch: micro {d.micro_batch_size} x grad-accum {d.gradient_accumulation_steps} x data "
        f"{d.data_parallel_size} = {d.train_batch_size} sequences "
        f"({d.train_batch_size * cfg.model.seq_length:,} tokens) per step, {d.train_iters:,} steps",
    ]
    asked = cfg.optimizer.zero_optimization.stage
    if d.zero_stage != asked:
        lines.append(f"ZeRO stage {asked} with {d.precision} runs as stage {d.zero_stage}: the same updates; "
                     "DeepSpeed 0.19's mixed precision is broken at stage 0")
    if d.padded_vocab_size is None:
        lines.append("parameters: unknown (set vocab_size or make the tokenizer file available)")
        if cluster is not None:
            lines.append("step time: unknown without the vocabulary size")
        return "\n".join(lines)
    shape, lay, mem = plan_config(cfg)
    lines += [
        f"vocabulary: {d.vocab_size:,} -> padded {d.padded_vocab_size:,}",
        f"parameters: {shape.total_parameters:,} ({shape.total_parameters})",
        "parameters per GPU by pipeline stage: " + ", ".join(f"{n:,}" for n in mem.stage_parameters),
    ]
    lines += _memory_lines(lay, mem)
    if cluster is None:
        lines += [_fit_line(mem, load_cluster(CLUSTERS / name)) for name in FIT_CHECKS]
        lines.append("step time: name the machines with --cluster FILE (configs/clusters/)")
        if search_layouts:
            lines.append("--search needs --cluster")
        return "\n".join(lines)
    st = step_time(shape, lay, cluster)
    if search_layouts:
        lines.append(f"layouts of {lay.world} GPUs on {cluster.name}, fastest first (global batch "
                     f"{d.train_batch_size} x {cfg.model.seq_length} tokens kept):")
        lines.append(table(search(shape, lay, cluster), lay, cluster))
    lines += _time_lines(cfg, lay, mem, cluster, st)
    return "\n".join(lines)
