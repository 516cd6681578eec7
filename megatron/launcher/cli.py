"""Config keys given on deepy.py's command line, and how they reach the workers.

GPT-NeoX's `python deepy.py eval.py CONFIG.yml --eval_tasks lambada_openai piqa` sets a config
key after the files. deepy.py parses it, validates the merged config, and appends the same
options to every worker's command line (after the config files); the worker splits them off
again. No file is written, so nothing has to be shared between nodes.
"""

from __future__ import annotations

import argparse
from typing import Any

# option -> (config key, help)
OPTIONS = {"--eval_tasks": ("eval_tasks", "lm-evaluation-harness tasks, overriding eval_tasks of the configs")}


def add_options(parser: argparse.ArgumentParser) -> None:
    for option, (key, text) in OPTIONS.items():
        parser.add_argument(option, dest=key, nargs="+", metavar="TASK", help=text)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys set on the command line."""
    return {key: getattr(args, key) for key, _ in OPTIONS.values() if getattr(args, key, None) is not None}


def as_arguments(cli: dict[str, Any]) -> list[str]:
    """The options that give a worker the same keys."""
    argv: list[str] = []
    for option, (key, _) in OPTIONS.items():
        if key in cli:
            argv += [option, *map(str, cli[key])]
    return argv


def split_worker_argv(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(config files, command-line keys) of a worker's arguments; DeepSpeed's runner adds
    --local_rank=N, which is dropped (the rank is in the environment too)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("configs", nargs="*")
    parser.add_argument("--local_rank", type=int)
    add_options(parser)
    args = parser.parse_args(argv)
    return args.configs, given(args)
