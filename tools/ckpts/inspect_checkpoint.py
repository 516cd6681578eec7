#!/usr/bin/env python
"""Print what a checkpoint holds: layout, iteration, every tensor, the stored config.

    python tools/ckpts/inspect_checkpoint.py SAVE_DIR [--iteration N] [--no-tensors]

Works on this framework's checkpoints and GPT-NeoX's, pipeline or plain layout. Tensors are
listed per layer and tensor rank with shape and dtype as stored (names as in the files).
Nothing is loaded into memory beyond one file's index at a time (files are memory-mapped).
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.checkpointing.errors import CheckpointError  # noqa: E402
from megatron.checkpointing.reader import CheckpointReader  # noqa: E402


def summary(reader: CheckpointReader) -> list[str]:
    stages = {"plain": "plain (no pipeline)", "zero3": "plain (no pipeline), ZeRO 3: weights partitioned over "
              "data-parallel ranks"}.get(reader.layout, f"pipeline, {reader.pipe_parallel_size} stage(s)")
    return [
        f"checkpoint   {reader.path}",
        f"written by   {'this framework' if reader.is_ours else 'GPT-NeoX (no format marker)'}",
        f"iteration    {reader.iteration}",
        f"layout       {stages}, tensor parallel {reader.tp}",
        f"layers       {reader.num_layers} transformer layers, numbers {reader.numbers}"
        f"{', output tied to the embedding' if reader.tied else ''}",
        f"optimizer    {'present' if reader.has_optimizer_state else 'none (weights only)'}",
        f"vocabulary   {reader.vocab_size() or 'unknown (no tokenizer)'}",
    ]


def tensor_lines(reader: CheckpointReader) -> list[str]:
    lines = []
    for number in reader.numbers:
        lines.append(f"layer {number}")
        shards = reader.layer_shards(number)
        for key, first in shards[0].items():
            shapes = " | ".join(str(list(s[key].shape)) for s in shards)
            lines.append(f"  {key:45s} {str(first.dtype).replace('torch.', ''):9s} {shapes}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="checkpoint directory (with `latest`)")
    parser.add_argument("--iteration", type=int, help="read global_stepN instead of `latest`")
    parser.add_argument("--no-tensors", action="store_true", help="skip the tensor list")
    parser.add_argument("--allow-unsafe", action="store_true", help="unpickle files that need more than data types")
    args = parser.parse_args(argv)
    try:
        reader = CheckpointReader(args.input, args.iteration, args.allow_unsafe)
        lines = summary(reader)
        if not args.no_tensors and reader.layout != "zero3":
            lines += ["", "tensors (shape per tensor rank):", *tensor_lines(reader)]
        stored = reader.stored_config()
        if stored:
            lines += ["", "stored config (configs/, merged):", yaml.safe_dump(stored, sort_keys=True).rstrip()]
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
