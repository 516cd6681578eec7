"""Body of the multi-process memory test (tests/planning/test_planner.py): every rank of a gloo
group measures its own peak under the framework's DeepSpeed engine and writes it to a file."""

from __future__ import annotations

import json
from pathlib import Path


def measure_rank(rank: int, world: int, config_path: str, out_dir: str) -> None:
    import os

    import deepspeed
    import torch

    from megatron.config import load_config
    from megatron.planning.measure import measure_engine

    torch.set_num_threads(1)
    # What a launcher sets and DeepSpeed's engine asserts; one node, so the local rank is the rank.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group run_distributed made
    cfg = load_config([config_path], world_size=world, require_files=False)
    got = measure_engine(cfg)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"peak": got.peak_bytes, "state": got.state_bytes,
                                                                  "stage": got.stage}))
