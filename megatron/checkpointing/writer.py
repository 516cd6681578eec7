"""Writing whole layers as a checkpoint of any tensor/pipeline layout, one layer at a time.

The output is what this framework's training writes (docs/checkpoints.md): in the pipeline
layout one `layer_XX-model_YY-model_states.pt` per layer and tensor rank plus one
`mp_rank_YY_model_states.pt` per model-parallel rank holding the client state; in the plain
layout (`pp == 0`) one `mp_rank_YY_model_states.pt` per tensor rank with the whole module. No
optimizer state is written, so training starts from it with `finetune: true` or `load` (weights
only). The tag directory is written under a temporary name and renamed when complete, and
`latest` moves last, so an interrupted conversion never leaves a checkpoint that looks usable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from megatron.checkpointing import layout
from megatron.checkpointing.reader import describe
from megatron.config.schema import ModelConfig
from megatron.model.rotary import RotaryEmbedding
from megatron.tokenizer.tokenizer import pad_vocab_size

Layer = tuple[int, dict[str, torch.Tensor]]  # (layer number, whole tensors by canonical name)


def module_index(number: int, num_layers: int) -> int:
    """Position of layer `number` in the plain model's module list (`GPTModel.layers`)."""
    if number == 0:
        return 0
    return number - 1 if number <= num_layers + 1 else number - 2


def _with_buffers(number: int, tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Add the rotary buffer our layer modules keep in their state dict (a strict load wants it)."""
    if model.pos_emb != "rotary" or "attention.query_key_value.weight" not in tensors:
        return tensors
    head_dim = model.hidden_size // model.num_attention_heads
    rotary = RotaryEmbedding(int(head_dim * model.rotary_pct), model.rotary_emb_base)
    return {**tensors, "attention.rotary_emb.inv_freq": rotary.inv_freq}


def write_checkpoint(
    save_dir: str | Path, iteration: int, layers: Iterable[Layer], model: ModelConfig, vocab_size: int | None,
    tp: int, pp: int, row_bias: str = layout.REPLICATED, dtype: torch.dtype | None = None,
    config_files: dict[str, str] | None = None, client: dict[str, Any] | None = None,
) -> Path:
    """Write `layers` (every weighted layer, whole) as SAVE_DIR/global_stepN at `tp` x `pp`.

    vocab_size: the tokenizer's size; vocabulary matrices are padded for `tp` from it (from
    their row count when None). row_bias "sum" writes GPT-NeoX's convention for the parallel
    residual (the whole bias on rank 0). config_files: name -> YAML text for configs/."""
    save_dir = Path(save_dir)
    tag = f"global_step{iteration}"
    final, tmp = save_dir / tag, save_dir / f"{tag}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]  # per rank: a layer (pipe) or all
    padded = None
    for number, tensors in layers:
        tensors = _with_buffers(number, tensors, model)
        for key, full in tensors.items():
            if dtype is not None and full.is_floating_point() and not key.endswith("inv_freq"):
                full = full.to(dtype)
            if key in layout.VOCAB:
                padded = pad_vocab_size(vocab_size or full.shape[0], model.make_vocab_size_divisible_by, tp)
                full = layout.resize_vocab(key, full, padded)
            for rank, shard in enumerate(layout.split(key, full, tp, model, row_bias)):
                # clone: a chunk is a view, and torch.save would write the whole tensor's storage
                name = key if pp else f"layers.{module_index(number, model.num_layers)}.{key}"
                shards[rank][name] = shard.clone()
        if pp:
            for rank in range(tp):
                torch.save(shards[rank], tmp / layout.layer_file(number, rank))
                shards[rank] = {}
    state = {**describe(model, vocab_size, padded), "iteration": iteration, "consumed_samples": 0,
             "global_steps": iteration, "checkpoint_parallel_dimensions": {"pp_degree": max(pp, 1), "tp_degree": tp},
             "mp_world_size": tp * max(pp, 1), "dp_world_size": 1, "module": None, **(client or {})}
    state["format"] = {**state["format"], "row_parallel_bias": row_bias}
    for rank in range(tp * max(pp, 1)):
        torch.save({**state, "module": shards[rank] if not pp else None}, tmp / layout.engine_file(rank))
    if config_files:
        (tmp / "configs").mkdir()
        for name, text in config_files.items():
            (tmp / "configs" / name).write_text(text)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest = save_dir / "latest.tmp"
    latest.write_text(tag)
    os.replace(latest, save_dir / "latest")
    return final
