"""Building the DeepSpeed engine around the model, and one training/eval step on it.

The execution mode is chosen once, here: pipe_parallel_size >= 1 gives DeepSpeed's pipeline
engine (GPT-NeoX's default, per-layer checkpoint files), 0 gives the plain engine (ZeRO 2/3).
Both expose the same `train_batch` / `eval_batch`, so the loop does not branch on the mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist

from megatron.checkpointing.loading import LoadPlan, load_weights, open_checkpoint, plan_load
from megatron.config import NeoXConfig, deepspeed_config
from megatron.config.deepspeed import framework_clips
from megatron.parallel.device import local_device
from megatron.model.gpt import GPTModel, layer_defs
from megatron.model.loss import LossFn, loss_function
from megatron.parallel.groups import ParallelGroups
from megatron.parallel.layers import mark_for_grad_norm
from megatron.parallel.pipeline import to_pipeline_module
from megatron.training.lr_schedule import AnnealingLR
from megatron.training.optimizer import build_optimizer, clip_in_optimizer

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, labels), each [micro_batch, seq]


class Stepper(ABC):
    """One optimizer step (all micro-batches of a global batch) and one eval batch."""

    def __init__(self, engine: deepspeed.DeepSpeedEngine, gas: int, groups: ParallelGroups, loss_fn: LossFn) -> None:
        self.engine = engine
        self.gas = gas
        self.groups = groups
        self.loss_fn = loss_fn  # the pipeline engine holds its own reference, in the module

    @abstractmethod
    def train_batch(self, data: Iterator[Batch]) -> float:
        """Mean loss of one global batch, averaged over data-parallel ranks, after the step."""

    @abstractmethod
    def eval_batch(self, data: Iterator[Batch]) -> float:
        """Mean loss of one global batch without updating anything."""

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self) -> float | None:
        optimizer = self.engine.optimizer
        scale = getattr(optimizer, "loss_scale", None) or getattr(optimizer, "cur_scale", None)
        return float(scale) if scale is not None and self.engine.fp16_enabled() else None

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)


class PipelineStepper(Stepper):
    def train_batch(self, data: Iterator[Batch]) -> float:
        return float(self.engine.train_batch(data_iter=data))

    def eval_batch(self, data: Iterator[Batch]) -> float:
        return float(self.engine.eval_batch(data_iter=data))


class PlainStepper(Stepper):
    def _to_device(self, batch: Batch) -> Batch:
        return tuple(t.to(self.engine.device) for t in batch)

    def _mean_over_data_parallel(self, losses: list[torch.Tensor]) -> float:
        loss = torch.stack(losses).mean()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        return float(loss)

    def train_batch(self, data: Iterator[Batch]) -> float:
        self.engine.train()
        losses = []
        for _ in range(self.gas):
            tokens, labels = self._to_device(next(data))
            loss = self.loss_fn(self.engine(tokens), labels)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            losses.append(loss.detach())
        return self._mean_over_data_parallel(losses)

    @torch.no_grad()
    def eval_batch(self, data: Iterator[Batch]) -> float:
        self.engine.eval()
        losses = []
        for _ in range(self.gas):
            tokens, labels = self._to_device(next(data))
            losses.append(self.loss_fn(self.engine(tokens), labels))
        self.engine.train()
        return self._mean_over_data_parallel(losses)


def build_engine(cfg: NeoXConfig, groups: ParallelGroups) -> tuple[Stepper, AnnealingLR, LoadPlan | None]:
    """Model on this rank's device (with a checkpoint's weights when `load` is resharded, see
    megatron/checkpointing/loading.py), optimizer, LR schedule, DeepSpeed engine."""
    d = cfg.derived
    defs = layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                      cfg.training.seed, device=local_device(), tp=groups.tensor, vocab_size=d.vocab_size)
    pipelined = d.pipelined
    loss_fn = loss_function(groups.tensor, cfg.training.compile_loss, masked=cfg.training.eod_mask_loss)
    if pipelined:
        module = to_pipeline_module(defs, cfg.parallel, cfg.training, d.pipe_stages, d.data_parallel_size, loss_fn,
                                    mpu=groups)
    else:
        ckpt = cfg.training.checkpoint_num_layers if cfg.training.checkpoint_activations else 0
        module = GPTModel(defs, checkpoint_num_layers=ckpt)
    ck = cfg.checkpoint
    reader = open_checkpoint(ck.load, ck.save, ck.allow_unsafe_checkpoint_load) if ck.load else None
    plan = plan_load(reader, ck.finetune, not ck.no_load_optim, cfg.parallel.model_parallel_size,
                     cfg.parallel.pipe_parallel_size, d.data_parallel_size, d.zero_stage)
    if plan is not None and plan.way == "resharded":
        load_weights(module, plan.reader, cfg.model, groups.tensor)  # before DeepSpeed copies them
    mark_for_grad_norm(module, groups.tensor)
    optimizer = build_optimizer(module, cfg.optimizer, d.lr)
    if framework_clips(cfg):
        clip_in_optimizer(optimizer, cfg.optimizer.gradient_clipping, groups.get_model_parallel_group())
    scheduler = AnnealingLR(optimizer, d.lr, cfg.lr.min_lr, d.warmup_iters, d.lr_decay_iters,
                            cfg.lr.lr_decay_style, use_checkpoint_schedule=cfg.lr.use_checkpoint_lr_scheduler)
    from_universal = plan is not None and plan.way == "universal"
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, load_universal=from_universal),
        dist_init_required=False,
        # The pipeline engine builds its groups from the module's topology; the plain one
        # takes ours (tensor-parallel ranks share data, ZeRO shards over data ranks only).
        mpu=None if pipelined else groups,
    )
    stepper_cls = PipelineStepper if pipelined else PlainStepper
    return stepper_cls(engine, d.gradient_accumulation_steps, groups, loss_fn), scheduler, plan
