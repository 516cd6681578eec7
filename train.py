#!/usr/bin/env python
"""Worker entry point, started once per rank by deepy.py (or alone: `python train.py CONFIG.yml`)."""

from __future__ import annotations

import os
import sys

from megatron.checkpointing.checkpoint import CheckpointError
from megatron.config import ConfigError
from megatron.data.indexed_dataset import IndexedDatasetError
from megatron.launcher.cli import split_worker_argv
from megatron.training.loop import TrainingError, pretrain
from megatron.training.setup import lost_another_rank, worker_config


def main(argv: list[str]) -> int:
    configs, cli = split_worker_argv(argv)
    try:
        cfg, _ = worker_config(configs, cli)
        pretrain(cfg)
    except (ConfigError, CheckpointError, IndexedDatasetError, TrainingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:
        if not lost_another_rank(err):
            raise
        rank = os.environ.get("RANK", "?")
        print(f"error: rank {rank} lost another rank in a collective (it died, or did not answer within "
              f"distributed_timeout_minutes): {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # gloo's destructors abort (SIGABRT) when a peer is gone; the exit code must say 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
