"""Loading a checkpoint of any layout into this rank's part of the model.

Three ways in, chosen once per run by `plan_load` (docs/checkpoints.md, "Loading into a run"):
- native: our own checkpoint of the same tensor, pipeline and data-parallel layout with its
  optimizer state goes through DeepSpeed's `load_checkpoint` (weights, optimizer, scheduler,
  RNG: a bit-exact resume);
- universal: the same, but saved with ZeRO 1/2 at another data-parallel size, which DeepSpeed
  refuses to load as it is: converted once to DeepSpeed's universal checkpoint
  (`megatron/checkpointing/universal.py`) and loaded with `load_universal`, so the optimizer
  state carries over and the run continues as if it had not changed size;
- resharded: anything else (another layout, GPT-NeoX's files, a converted Hugging Face model,
  `finetune: true`) is read layer by layer (`CheckpointReader`), cut for this rank's tensor
  slice and pipeline stage, and copied into the module BEFORE DeepSpeed wraps it, so fp32
  master weights and ZeRO partitions start from the loaded values. Optimizer state starts
  fresh; the run says so in one line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch import nn

from megatron.checkpointing import layout, universal
from megatron.checkpointing.errors import CheckpointError
from megatron.checkpointing.reader import TAG, CheckpointReader, list_tags
from megatron.config import NeoXConfig
from megatron.config.schema import ModelConfig

if TYPE_CHECKING:  # the groups module imports DeepSpeed, which offline tools do not need
    from megatron.parallel.groups import TensorParallel

# Fields that must agree between the checkpoint and the run for the weights to mean the same model.
ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "norm", "pos_emb", "rotary_pct",
                "gpt_j_residual", "activation", "bias_gelu_fusion")


@dataclass
class LoadPlan:
    reader: CheckpointReader
    way: Literal["native", "universal", "resharded"]
    why: str  # printed when the run starts from it


def open_checkpoint(load_dir: str, save_dir: str | None, allow_unsafe: bool = False) -> CheckpointReader | None:
    """The checkpoint `load` names, or None to start from scratch.

    Starting from scratch is right for a job's first run only: `load` is the run's own `save`
    directory and nothing has been saved there yet (the usual `load: X` + `save: X` recipe).
    A `load` that does not exist or holds nothing usable otherwise is an error, so a typo never
    silently trains from scratch. When the newest checkpoint is incomplete (a crash while it was
    copied, say), the newest complete one before it is used, with a warning naming both."""
    root = Path(load_dir)
    tags = list_tags(root) if root.is_dir() else []
    if not (root / "latest").is_file():
        if tags:
            raise CheckpointError(f"load: {root} holds {', '.join(tags)} but no `latest` file naming the one to "
                                  f"resume; write it, e.g. echo {tags[0]} > {root / 'latest'}")
        if save_dir is not None and root.resolve() == Path(save_dir).resolve():
            return None
        state = "does not exist" if not root.is_dir() else "holds no checkpoint"
        raise CheckpointError(f"load: {root} {state}; point load at a checkpoint directory (one with "
                              "`latest`), or at save's directory to start a new run there")
    try:
        reader = CheckpointReader(root, allow_unsafe=allow_unsafe)
        reader.verify()
        unfinished = [t for t in tags if int(TAG.match(t).group(1)) > reader.iteration]
        if unfinished:
            _warn(f"WARNING: {', '.join(unfinished)} in {root} was never completed (the job stopped while "
                  f"writing it); resuming from the last complete checkpoint, {reader.path.name}")
        return reader
    except CheckpointError as newest:
        for tag in tags:
            try:
                older = CheckpointReader(root, int(TAG.match(tag).group(1)), allow_unsafe)
                older.verify()
            except CheckpointError:
                continue
            _warn(f"WARNING: the checkpoint `latest` names is unusable ({newest}); loading the newest "
                  f"complete one instead: {older.path}")
            return older
        raise


def _warn(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, file=sys.stderr, flush=True)


def plan_load(reader: CheckpointReader | None, finetune: bool, load_optim: bool, tp: int, pp: int, dp: int,
              zero_stage: int) -> LoadPlan | None:
    """How to load `reader` (None: nothing to load) into a run of this layout. `zero_stage` is
    the run's: DeepSpeed loads a universal checkpoint through ZeRO 1/2 only."""
    if reader is None:
        return None
    if finetune:
        return LoadPlan(reader, "resharded", "finetune: weights only, iteration 0")
    same_layout = (reader.is_ours and reader.layout in (("pipe",) if pp >= 1 else ("plain", "zero3"))
                   and reader.tp == tp and reader.pipe_parallel_size == pp)
    stored_dp = int(reader.client.get("dp_world_size", dp))
    if same_layout and stored_dp == dp and (reader.has_optimizer_state or not load_optim):
        return LoadPlan(reader, "native", "same layout: weights, optimizer, scheduler and RNG")
    source = (f"{'this framework' if reader.is_ours else 'GPT-NeoX'}, {reader.layout} layout, "
              f"TP {reader.tp} x PP {reader.pipe_parallel_size} x DP {stored_dp}")
    if not reader.has_optimizer_state:
        missing = "no optimizer state in it"
    elif not same_layout:
        missing = "optimizer state not resharded"
    elif not load_optim:
        missing = "no_load_optim"
    elif universal.zero_stage(reader) not in (1, 2) or zero_stage not in (1, 2):
        missing = (f"ZeRO {universal.zero_stage(reader)} to ZeRO {zero_stage}: optimizer state crosses "
                   "data-parallel sizes only from and into ZeRO 1/2")
    elif not (universal.folder(reader).is_dir() or os.access(reader.path, os.W_OK)):
        missing = f"{reader.path} is read-only, no room for the universal conversion of the optimizer state"
    else:
        return LoadPlan(reader, "universal", f"same layout, DP {stored_dp} to DP {dp}: weights, optimizer, "
                                             "scheduler and RNG through DeepSpeed's universal checkpoint")
    return LoadPlan(reader, "resharded", f"resharded from {source} to TP {tp} x PP {pp} x DP {dp}: weights only "
                                         f"({missing}; optimizer and RNG start fresh)")


def local_layers(module: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer number, module) for every weighted layer this rank holds, a tied embedding once."""
    from deepspeed.pipe import PipelineModule

    if isinstance(module, PipelineModule):
        found = [(i + module._local_start, f) for i, f in enumerate(module.forward_funcs) if isinstance(f, nn.Module)]
        for tied in module.tied_modules.values():  # on the last stage the tied output is layer 0's
            if not any(m is tied for _, m in found):
                found.append((0, tied))
        return found
    # GPTModel: step i of the layer list is layer number i; the tied output runs layer 0's module.
    return [(number, module.layers[index]) for number, (index, fn) in enumerate(module.steps)
            if index is not None and fn is None]


def check_architecture(reader: CheckpointReader, model: ModelConfig) -> None:
    try:
        stored, _ = reader.model_config()
    except CheckpointError:
        stored = None  # nothing stored: shapes are still checked tensor by tensor
    problems = [f"{k} {getattr(stored, k)!r} in the checkpoint, {getattr(model, k)!r} in the config"
                for k in ARCHITECTURE if stored is not None and getattr(stored, k) != getattr(model, k)]
    if not reader.tied and not model.no_weight_tying:
        problems.append("the checkpoint has its own output layer but the config ties it to the embedding "
                        "(set no_weight_tying: true)")
    if reader.num_layers != model.num_layers:
        problems.append(f"{reader.num_layers} transformer layers in the checkpoint, num_layers {model.num_layers}")
    if problems:
        raise CheckpointError(f"{reader.path} is another model: " + "; ".join(dict.fromkeys(problems)))


@torch.no_grad()
def load_weights(module: nn.Module, reader: CheckpointReader, model: ModelConfig, tp: TensorParallel) -> None:
    """Copy the checkpoint's weights into this rank's layers (any stored layout)."""
    check_architecture(reader, model)
    output = layout.output_number(model.num_layers)
    for number, layer in local_layers(module):
        if number == output and reader.tied:  # untied run from a tied checkpoint
            tensors = {"final_linear.weight": reader.layer(0, model.gpt_j_residual, model)["word_embeddings.weight"]}
        else:
            tensors = reader.layer(number, model.gpt_j_residual, model)
        target = {k: v for k, v in layer.state_dict().items() if layout.canonical_key(k) is not None}
        if set(target) != set(tensors):
            raise CheckpointError(f"{reader.path}: layer {number} holds {sorted(tensors)}, the model expects "
                                  f"{sorted(target)}")
        for key, param in target.items():
            full = tensors[key]
            if key in layout.VOCAB:
                full = layout.resize_vocab(key, full, param.shape[0] * tp.size)
            shard = layout.split(key, full, tp.size, model)[tp.rank]
            if shard.shape != param.shape:
                raise CheckpointError(f"{reader.path}: layer {number} {key} has shape {list(full.shape)}, which "
                                      f"gives {list(shard.shape)} per rank at TP {tp.size}; the model has "
                                      f"{list(param.shape)}")
            param.copy_(shard)


def load_model_weights(model: nn.Module, load_dir: str, cfg: NeoXConfig, tp: TensorParallel) -> int:
    """Load `load_dir`'s latest checkpoint, any layout, into a plain model; returns its iteration."""
    reader = CheckpointReader(load_dir, allow_unsafe=cfg.checkpoint.allow_unsafe_checkpoint_load)
    load_weights(model, reader, cfg.model, tp)
    return reader.iteration

