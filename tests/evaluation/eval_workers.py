"""Body of the multi-process harness-model test (tests/evaluation/test_eval.py): every rank builds
the model at a layout as eval.py does and runs the same requests; rank 0 writes the answers."""

from __future__ import annotations

import json
import os
from pathlib import Path


def rolling_and_generation(rank: int, world: int, model_yml: str, layout: dict, requests: dict, out: str) -> None:
    import deepspeed
    from lm_eval.api.instance import Instance

    from megatron.config import load_config
    from megatron.evaluation.run import build_model, harness_model
    from megatron.parallel.groups import ParallelGroups
    from megatron.training.setup import config_tokenizer

    # What a launcher sets and DeepSpeed's engine asserts; one node, so the local rank is the rank.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group run_distributed made
    cfg = load_config([model_yml], world_size=world, require_files=False, training=False, cli=layout)
    d, par = cfg.derived, cfg.parallel
    groups = ParallelGroups(d.pipe_stages, par.model_parallel_size, d.data_parallel_size, par.sequence_parallel)
    lm = harness_model(cfg, config_tokenizer(cfg), build_model(cfg, groups), groups, progress=False)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                        for i, t in enumerate(requests["rolling"])])
    generated = lm.generate_until([Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 12}), i)
                                   for i, (p, s) in enumerate(requests["generate"])])
    if rank == 0:
        Path(out).write_text(json.dumps({"rolling": rolling, "generated": generated}))
