"""Exact parameter counts (from the model built on the meta device) and a per-GPU memory plan.

Nothing here allocates weights: the 20B is counted by building its layer list on "meta".

Memory model (bytes per GPU, the heaviest pipeline stage):
- weights and gradients: 2 bytes each in fp16/bf16, 4 in fp32;
- optimizer state: fp32 master copy + Adam m and v = 12 bytes per parameter in mixed precision,
  8 in fp32; ZeRO-1 divides it by the data-parallel size, ZeRO-2 also the gradients, ZeRO-3 also
  the weights;
- activations per layer and micro-batch, after Korthikanti et al. (2022) with a fused attention
  kernel (SDPA/flash stores no seq x seq scores): s*b*h*(10 + 24/t) * bytes/2. Checkpointing
  stores only each chunk's input (s*b*h elements per checkpoint_num_layers layers) plus one
  chunk's full set during recompute.
  With the 1F1B pipeline schedule the first stage holds min(pp, grad-accum) micro-batches;
- the last stage also holds fp32 logits s*b*V/t for the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron.config.config import NeoXConfig
from megatron.model.gpt import GPTModel, layer_defs



def meta_model(cfg: NeoXConfig) -> GPTModel:
    d = cfg.derived
    if d.padded_vocab_size is None:
        raise ValueError("the vocabulary size is unknown: set vocab_size or a tokenizer")
    defs = layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                      cfg.training.seed, device="meta", vocab_size=d.vocab_size)
    return GPTModel(defs)


def _module_params(module: nn.Module, tp: int) -> int:
    """Parameters one tensor-parallel rank holds. The layers mark what tensor parallelism splits
    (`tp_sharded`, set even at size 1); the rest (norms, row-parallel biases, learned position
    embeddings) is replicated. Whatever is absent (biases, a bias-free norm's offset) counts 0,
    and grouped-query attention's smaller query_key_value splits like any column-parallel weight."""
    return sum(p.numel() // tp if getattr(p, "tp_sharded", False) else p.numel() for p in module.parameters())


@dataclass(frozen=True)
class SizePlan:
    total_parameters: int
    stage_parameters: list[int]  # per tensor-parallel rank, per pipeline stage
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_no_ckpt: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def stage_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Transformer layers per stage, balanced as DeepSpeed's 'type:transformer' partitioning."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def plan(cfg: NeoXConfig) -> SizePlan:
    model = meta_model(cfg)
    tp, pp = cfg.parallel.model_parallel_size, cfg.derived.pipe_stages
    dp, d = cfg.derived.data_parallel_size, cfg.derived
    L, tied = cfg.model.num_layers, not cfg.model.no_weight_tying
    mods = list(model.layers)  # [embedding, L layers, final norm, output unless tied]
    embed, blocks, norm = mods[0], mods[1:1 + L], mods[1 + L]
    out = embed if tied else mods[2 + L]  # tied: the last stage holds its own copy when pp > 1
    stages = []
    for s, layers in enumerate(stage_layer_ranges(cfg.model.num_layers, pp)):
        n = sum(_module_params(blocks[i], tp) for i in layers)
        if s == 0:
            n += _module_params(embed, tp)
        if s == pp - 1:
            n += _module_params(norm, tp)
            if pp > 1 or not tied:
                n += _module_params(out, tp)
        stages.append(n)
    params = max(stages)
    half = d.precision in ("fp16", "bfloat16")
    wbytes = 2 if half else 4
    opt_bytes = 12 if half else 8
    stage = cfg.derived.zero_stage
    weights = params * wbytes // (dp if stage >= 3 else 1)
    grads = params * wbytes // (dp if stage >= 2 else 1)
    optim = params * opt_bytes // (dp if stage >= 1 else 1)

    s, b, h = cfg.model.seq_length, d.micro_batch_size, cfg.model.hidden_size
    layers_per_stage = len(stage_layer_ranges(cfg.model.num_layers, pp)[0])
    in_flight = min(pp, d.gradient_accumulation_steps)
    full_layer = int(s * b * h * (10 + 24 / tp) * wbytes / 2)
    # Sequence parallelism keeps each layer's input split over the tensor-parallel ranks.
    layer_input = s * b * h * wbytes // (tp if cfg.parallel.sequence_parallel else 1)
    no_ckpt = full_layer * layers_per_stage * in_flight
    chunk = cfg.training.checkpoint_num_layers
    ckpt = layer_input * -(-layers_per_stage // chunk) * in_flight + full_layer * chunk
    logits = s * b * (d.padded_vocab_size // tp) * 4
    return SizePlan(
        total_parameters=sum(p.numel() for p in model.parameters()),
        stage_parameters=stages, weights=weights, gradients=grads, optimizer=optim,
        activations=ckpt if cfg.training.checkpoint_activations else no_ckpt,
        activations_no_ckpt=no_ckpt, logits=logits,
    )


def device_memory_bytes() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
