"""Running batches of token ids through the model at the run's own layout.

A replica is the TP x PP ranks that hold one copy of the model (one data-parallel index). Each
replica takes every `replicas`-th batch. Inside a replica:

- without a pipeline, every rank runs the whole layer list on its tensor-parallel shard;
- with one (DeepSpeed's PipelineModule, as training builds it), stage 0 embeds the tokens and
  each stage sends its output to the next (a small header tensor gives the shape and dtype, so
  sequence-parallel or half-precision activations pass as they are).

The last stage turns its vocabulary-split logits into a small result with a function the caller
gives (`head`; it may gather across the tensor-parallel group) and broadcasts it over the
pipeline, so every rank of the replica holds it. At the end every rank holds every batch's
result, in batch order (one all-gather of Python objects).

At ZeRO stage 3 a forward gathers parameters over the data-parallel ranks, so there every
replica runs the same number of forwards (a replica short of batches repeats one and drops its
result).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron.parallel.groups import TensorParallel

Head = Callable[[torch.Tensor], Any]  # [b, s, vocab / tp] logits -> a picklable result
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass
class Replica:
    module: nn.Module  # GPTModel (or DeepSpeed's ZeRO-wrapped copy) or a PipelineModule
    tp: TensorParallel
    replica_rank: int  # the data-parallel index
    replicas: int
    lockstep: bool = False  # ZeRO-3: every replica runs the same number of forwards

    def __post_init__(self) -> None:
        grid = getattr(self.module, "_grid", None)  # only DeepSpeed's PipelineModule has one
        self.stages = grid.pipe_parallel_size if grid is not None else 1
        self.stage = grid.get_stage_id() if grid is not None else 0
        self.grid = grid
        self.device = next(self.module.parameters()).device

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def _send(self, x: torch.Tensor, dst: int) -> None:
        header = torch.zeros(6, dtype=torch.long)
        header[0], header[1] = _DTYPES.index(x.dtype), x.dim()
        header[2:2 + x.dim()] = torch.tensor(x.shape)
        dist.send(header.to(x.device), dst)
        dist.send(x.contiguous(), dst)

    def _recv(self, src: int) -> torch.Tensor:
        header = torch.zeros(6, dtype=torch.long, device=self.device)
        dist.recv(header, src)
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        x = torch.empty(header[2:2 + ndim].tolist(), dtype=dtype, device=self.device)
        dist.recv(x, src)
        return x

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, head: Head) -> Any:
        """head(logits) computed on the last stage, returned on every rank of this replica."""
        was_training = self.module.training
        self.module.eval()
        try:
            if self.stages == 1:
                return head(self.module(tokens.to(self.device)))
            x = tokens.to(self.device) if self.stage == 0 else self._recv(self.grid.stage_to_global(self.stage - 1))
            x = self.module(x)
            box = [None]
            if self.is_last_stage:
                box[0] = head(x)
            else:
                self._send(x, self.grid.stage_to_global(self.stage + 1))
            last = self.grid.stage_to_global(self.stages - 1)
            dist.broadcast_object_list(box, src=last, group=self.grid.get_pipe_parallel_group())
            return box[0]
        finally:
            self.module.train(was_training)

    def map(self, batches: Sequence[Any], fn: Callable[[Any], list[Any]]) -> list[Any]:
        """fn over every batch (this replica's share), results of all batches on every rank, in
        order. fn(batch) returns one result per item and may call `run` any number of times, the
        same on every rank of the replica."""
        rounds = -(-len(batches) // self.replicas)
        mine: list[tuple[int, list[Any]]] = []
        for r in range(rounds):
            k = r * self.replicas + self.replica_rank
            if k < len(batches):
                mine.append((k, fn(batches[k])))
            elif self.lockstep:
                fn(batches[0])
        if not dist.is_initialized() or dist.get_world_size() == 1:
            parts = [mine]
        else:
            # One rank per replica holds every result after the broadcasts; the others send nothing.
            leader = self.tp.rank == 0 and self.stage == 0
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine if leader else [])
        ordered = sorted((pair for part in parts for pair in part), key=lambda p: p[0])
        return [item for _, items in ordered for item in items]
