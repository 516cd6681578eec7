"""The optimizer: AdamW (or SGD) with weight decay on weight matrices only.

Biases and normalisation parameters get no decay (as in GPT-NeoX and Megatron): decaying a
layernorm gain towards 0 fights the normalisation itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from megatron.config.schema import OptimizerConfig

_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm))
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_norm or name.endswith("bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, opt: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    params = opt.optimizer.params
    groups = param_groups(model, opt.weight_decay)
    if opt.optimizer.type == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=params.momentum)
    # Adam with decoupled decay (GPT-NeoX's "Adam" with weight_decay is AdamW). torch's fused
    # kernel updates each tensor in one pass instead of a dozen elementwise ops: 3.5-4x faster
    # on the CPU (benchmarks/README.md), and DeepSpeed's ZeRO and mixed-precision wrappers step
    # it like any torch optimizer.
    fused = all(p.device.type in _FUSED_ADAMW_DEVICES for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(params.betas), eps=params.eps,
        fused=fused or None,
    )


def clip_in_optimizer(optimizer: torch.optim.Optimizer, max_norm: float, replica_group: Any = None) -> None:
    """Before every step, clip the gradients to `max_norm` (0: do not clip) and leave their
    global norm where DeepSpeed's engine reads it after the step (`_global_grad_norm`).

    For the one path where DeepSpeed clips but keeps no norm (fp32 without ZeRO, see
    `framework_clips`). The norm is DeepSpeed's: every gradient counted once across tensor ranks
    (the `model_parallel` flag of `mark_for_grad_norm`) and pipeline stages (tied copies carry
    `ds_pipe_replicated`), squares summed over the ranks of one replica; data-parallel ranks
    already hold the same all-reduced gradients.
    """
    def clip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        everything = [p for group in opt.param_groups for p in group["params"]]
        params = [p for p in everything if p.grad is not None]
        counted = [p.grad for p in params
                   if getattr(p, "model_parallel", True) and not getattr(p, "ds_pipe_replicated", False)]
        # Every rank of the replica joins the all-reduce, with or without gradients of its own.
        squares = get_total_norm(counted).to(everything[0].device, torch.float32).square()
        if replica_group is not None and dist.get_world_size(replica_group) > 1:
            dist.all_reduce(squares, group=replica_group)
        norm = squares.sqrt()
        if max_norm > 0:
            clip_grads_with_norm_(params, max_norm, norm)
        opt._global_grad_norm = float(norm)

    optimizer.register_step_pre_hook(clip)
