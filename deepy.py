#!/usr/bin/env python
"""Launch training: `python deepy.py train.py [-d CONFIG_DIR] CONFIG.yml [MORE.yml ...]`.

Config files merge left to right (a later file overrides an earlier one; overrides are listed);
with -d they are looked up in CONFIG_DIR, as in GPT-NeoX. The whole config is validated before
any process starts. `--dry-run` starts nothing: it prints the parallel layout, the exact
parameter count, a per-GPU memory estimate and the command each node will run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron.config import ConfigError, NeoXConfig, load_config
from megatron.launcher.dry_run import report
from megatron.planning.cluster import load_cluster
from megatron.launcher.cli import add_options, as_arguments, given
from megatron.launcher.environment import node_layout
from megatron.launcher.launch import launch, plan_launch
from megatron.config.validate import check_launchable


def commands(cfg: NeoXConfig, script: str, configs: list[str]) -> str:
    """What each node would run; a plan for a cluster stays printable where it cannot launch."""
    try:
        check_launchable(cfg)
    except ConfigError as err:
        return f"commands ({cfg.derived.launcher} launcher): not launchable as configured: {err}"
    plan = plan_launch(cfg, script, configs)
    return "\n".join([f"commands ({cfg.derived.launcher} launcher):"] + ["  " + line for line in plan.nodes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="validate and plan; launch nothing")
    parser.add_argument("--cluster", help="with --dry-run: a cluster file (configs/clusters/) to predict step time on")
    parser.add_argument("--search", action="store_true", help="with --dry-run --cluster: rank every layout that fits")
    parser.add_argument("script", help="the worker script, e.g. train.py")
    parser.add_argument("-d", "--conf_dir", help="directory the config files are in")
    parser.add_argument("configs", nargs="+", help="YAML config files, merged left to right")
    add_options(parser)
    args = parser.parse_args(argv)
    if args.conf_dir:
        args.configs = [str(Path(args.conf_dir) / c) for c in args.configs]
    try:
        # Data files are training's: generate.py and tools launched the same way do not read them.
        needs_data = Path(args.script).name == "train.py" and not args.dry_run
        nodes, per_node = node_layout(args.configs)
        cli = given(args)
        cfg = load_config(args.configs, world_size=nodes * per_node, num_nodes=nodes, require_files=needs_data,
                          cli=cli, training=Path(args.script).name == "train.py")
        for override in cfg.overrides:
            print(f"override {override}")
        if args.dry_run:
            print(report(cfg, load_cluster(args.cluster) if args.cluster else None, args.search))
            print(commands(cfg, args.script, args.configs + as_arguments(cli)))
            return 0
        check_launchable(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    # The command-line keys follow the config files on every worker's command line (launcher/cli.py).
    return launch(cfg, args.script, args.configs + as_arguments(cli))


if __name__ == "__main__":
    sys.exit(main())
