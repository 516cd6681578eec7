#!/usr/bin/env python
"""Rewrite a checkpoint for another tensor/pipeline layout, offline, one layer at a time.

    python tools/ckpts/reshard.py --input SAVE_DIR [--iteration N] --output DIR --tp 1 --pp 0

Reads this framework's checkpoints and GPT-NeoX's (pipeline or plain layout, any TP), writes
this framework's layout at `--tp` x `--pp` (`--pp 0`: the plain layout). No process group, no
GPU: each layer is read memory-mapped, merged, split and written before the next, so peak
memory is about one layer, not the model. Optimizer state is not carried (start from the result
with `finetune: true`, or `load` for weights only). `--for-gpt-neox` writes row-parallel biases
the way GPT-NeoX adds them (docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.checkpointing import layout  # noqa: E402
from megatron.checkpointing.errors import CheckpointError  # noqa: E402
from megatron.checkpointing.reader import CheckpointReader  # noqa: E402
from megatron.checkpointing.writer import Layer, write_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def layers(reader: CheckpointReader, parallel_residual: bool) -> Iterator[Layer]:
    for number in tqdm(reader.numbers, desc="layers", unit="layer", file=sys.stderr):
        yield number, reader.layer(number, parallel_residual)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="checkpoint directory (with `latest`)")
    parser.add_argument("--iteration", type=int, help="read global_stepN instead of `latest`")
    parser.add_argument("--output", required=True, help="directory to write (gets `latest`)")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size to write")
    parser.add_argument("--pp", type=int, required=True, help="pipeline stages to write; 0 = plain layout")
    parser.add_argument("--dtype", choices=DTYPES, help="convert floating-point weights")
    parser.add_argument("--for-gpt-neox", action="store_true",
                        help="row-parallel biases as GPT-NeoX adds them (parallel residual: summed shares)")
    parser.add_argument("--allow-unsafe", action="store_true", help="unpickle files that need more than data types")
    args = parser.parse_args(argv)
    try:
        if args.tp < 1 or args.pp < 0:
            raise CheckpointError(f"--tp must be >= 1 and --pp >= 0 (got {args.tp}, {args.pp})")
        reader = CheckpointReader(args.input, args.iteration, args.allow_unsafe)
        model, vocab = reader.model_config()
        row_bias = layout.SUMMED if args.for_gpt_neox and model.gpt_j_residual else layout.REPLICATED
        configs = {f.name: f.read_text() for f in sorted((reader.path / "configs").glob("*")) if f.is_file()}
        out = write_checkpoint(args.output, reader.iteration, layers(reader, model.gpt_j_residual), model, vocab,
                               args.tp, args.pp, row_bias, DTYPES.get(args.dtype), configs)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (TP {args.tp} x {'plain' if args.pp == 0 else f'PP {args.pp}'}, "
          f"from {reader.layout} TP {reader.tp}, iteration {reader.iteration})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
