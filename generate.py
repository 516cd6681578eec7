#!/usr/bin/env python
"""Text generation, started once per rank by deepy.py (`python deepy.py generate.py CONFIG.yml
configs/text_generation.yml`) or alone (`python generate.py CONFIG.yml ...`): GPT-NeoX's
text_gen_type unconditional / input-file / interactive (megatron/generation/run.py)."""

from __future__ import annotations

import sys

from megatron.checkpointing.errors import CheckpointError
from megatron.config import ConfigError
from megatron.generation.run import run
from megatron.launcher.cli import split_worker_argv


def main(argv: list[str]) -> int:
    configs, _ = split_worker_argv(argv)  # deepy.py's --eval_tasks means nothing to generation
    try:
        run(configs)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
