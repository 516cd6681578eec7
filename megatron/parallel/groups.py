"""Process groups for (pipe, data, model) parallelism.

Ranks are laid out as DeepSpeed's PipeModelDataParallelTopology does, with the model (tensor)
axis innermost: rank = (pipe * dp + data) * tp + model. Tensor-parallel ranks are therefore
neighbours and share a node, which matters because they talk in every layer.

`ParallelGroups` also serves DeepSpeed as its `mpu` for the plain (non-pipeline) engine; the
pipeline engine builds the same groups from the same topology.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology


@dataclass(frozen=True)
class TensorParallel:
    """What a layer needs to know about tensor parallelism."""

    size: int = 1
    rank: int = 0
    group: Any = None
    sequence_parallel: bool = False


SINGLE = TensorParallel()


def topology(pp: int, tp: int, dp: int) -> PipeModelDataParallelTopology:
    # Imported here: the model code uses this module, and offline tools (conversion,
    # resharding) build models without DeepSpeed's import time and accelerator probing.
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)


class ParallelGroups:
    """This rank's coordinates and groups. Every rank must build it (new_group is collective)."""

    def __init__(self, pp: int, tp: int, dp: int, sequence_parallel: bool = False) -> None:
        self.topo = topology(pp, tp, dp)
        rank = dist.get_rank()
        coord = self.topo.get_coord(rank)
        self.pp_rank, self.dp_rank, self.tp_rank = coord.pipe, coord.data, coord.model
        self.pp_size, self.dp_size, self.tp_size = pp, dp, tp
        self._groups: dict[str, Any] = {}
        # Same creation order on every rank: axes in a fixed order, each axis' lists in order.
        for axis in ("model", "data"):
            for ranks in self.topo.get_axis_comm_lists(axis):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    self._groups[axis] = group
        # Model-parallel in DeepSpeed's sense: all ranks holding different parts of one replica.
        for d in range(dp):
            ranks = sorted(self.topo.get_axis_list(axis="data", idx=d))
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                self._groups["replica"] = group
                self._replica_rank = ranks.index(rank)
        self.tensor = TensorParallel(tp, self.tp_rank, self._groups.get("model"), sequence_parallel and tp > 1)

    # --- DeepSpeed mpu interface ---
    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_group(self) -> Any:
        return self._groups["model"]

    def get_model_parallel_rank(self) -> int:
        return self._replica_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size * self.pp_size

    def get_model_parallel_group(self) -> Any:
        return self._groups["replica"]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self) -> Any:
        return self._groups["data"]

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp_size
