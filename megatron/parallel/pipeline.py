"""Wrapping the model's layer list for DeepSpeed's pipeline engine.

The layer list from `megatron.model.gpt.layer_defs` becomes LayerSpecs (TiedLayerSpec for a tied
embedding), so the pipeline engine builds only its stage's layers and writes one checkpoint file
per layer, numbered as in GPT-NeoX.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch.utils.checkpoint import checkpoint

from megatron.config.schema import ParallelConfig, TrainingConfig
from megatron.model.gpt import LayerDef
from megatron.model.loss import LossFn
from megatron.parallel.random import checkpoint_context, partitioned_checkpoint


def to_pipeline_module(
    defs: list[LayerDef], parallel: ParallelConfig, training: TrainingConfig, pipe_stages: int,
    data_parallel_size: int, loss_fn: LossFn, mpu: Any = None,
) -> PipelineModule:
    """`mpu` (the run's ParallelGroups) is needed for partition_activations at tensor parallel > 1."""
    specs = []
    for d in defs:
        if not isinstance(d.build, type):
            specs.append(d.build)  # weightless function: runs in place, writes no file
        elif d.tied_key:
            specs.append(TiedLayerSpec(d.tied_key, d.build, forward_fn=d.forward_fn,
                                       tied_weight_attr="word_embeddings.weight", **d.kwargs))
        else:
            specs.append(LayerSpec(d.build, **d.kwargs))
    ckpt = training.checkpoint_num_layers if training.checkpoint_activations else 0
    # With sequence_parallel the layer inputs are split already, and differ between tensor ranks.
    if training.partition_activations and parallel.model_parallel_size > 1 and not parallel.sequence_parallel:
        checkpoint_func = partitioned_checkpoint(mpu)
    else:
        # The non-reentrant function restores the RNG states (ours too, via checkpoint_context)
        # and accepts inputs that need no grad.
        checkpoint_func = partial(checkpoint, use_reentrant=False, context_fn=checkpoint_context)
    return PipelineModule(
        layers=specs,
        # (pipe, data, model) axes, model innermost: tensor-parallel ranks share a node, and file
        # names carry the model rank (layer_XX-model_YY-model_states.pt) as in GPT-NeoX.
        topology=PipeModelDataParallelTopology(
            num_pp=pipe_stages, num_mp=parallel.model_parallel_size,
            num_dp=data_parallel_size),
        loss_fn=loss_fn,
        partition_method=parallel.pipe_partition_method,
        activation_checkpoint_interval=ckpt,
        # Only transformer layers are recomputed.
        activation_checkpoint_func=checkpoint_func,
        checkpointable_layers=["TransformerLayer"],
    )
