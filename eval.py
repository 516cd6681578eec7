#!/usr/bin/env python
"""lm-evaluation-harness tasks on a checkpoint, started once per rank by deepy.py
(`python deepy.py eval.py CONFIG.yml [MORE.yml] --eval_tasks lambada_openai piqa`) or alone
(`python eval.py CONFIG.yml --eval_tasks piqa`): GPT-NeoX's entry point
(megatron/evaluation/run.py). The task documents come from `python prepare_data.py eval_tasks`."""

from __future__ import annotations

import sys

from megatron.checkpointing.errors import CheckpointError
from megatron.config import ConfigError
from megatron.evaluation.sources import EvalTaskError
from megatron.evaluation.run import run


def main(argv: list[str]) -> int:
    try:
        run(argv)
    except (ConfigError, CheckpointError, EvalTaskError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
