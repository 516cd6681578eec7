"""`deepy.py --dry-run`: the layout, the exact parameter count and a per-GPU memory plan."""

from __future__ import annotations

from megatron.config import NeoXConfig
from megatron.model.sizing import SizePlan, plan

GiB = 2**30
# Memory of common accelerators, to say at a glance whether the plan fits.
DEVICES_GB = {"A100-40GB": 40, "A100-80GB / H100": 80, "H200": 141}


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def report(cfg: NeoXConfig) -> str:
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
        return "\n".join(lines)
    sp: SizePlan = plan(cfg)
    stage = d.zero_stage
    ckpt = "on" if cfg.training.checkpoint_activations else "off"
    lines += [
        f"vocabulary: {d.vocab_size:,} -> padded {d.padded_vocab_size:,}",
        f"parameters: {sp.total_parameters:,} ({sp.total_parameters})",
        "parameters per GPU by pipeline stage: " + ", ".join(f"{n:,}" for n in sp.stage_parameters),
        f"memory per GPU, heaviest stage ({d.precision}, ZeRO-{stage}, activation checkpointing {ckpt}):",
        f"  weights            {_gib(sp.weights)}",
        f"  gradients          {_gib(sp.gradients)}",
        f"  optimizer state    {_gib(sp.optimizer)}",
        f"  activations        {_gib(sp.activations)}   (without checkpointing: {_gib(sp.activations_no_ckpt).strip()})",
        f"  logits (fp32 loss) {_gib(sp.logits)}",
        f"  total              {_gib(sp.total)}",
    ]
    for name, gb in DEVICES_GB.items():
        verdict = "fits" if sp.total <= gb * 1e9 * 0.9 else "does NOT fit"
        lines.append(f"  {verdict} a {name} ({gb} GB, keeping 10% for the allocator and buffers)")
    return "\n".join(lines)
