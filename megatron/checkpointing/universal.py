"""Carrying ZeRO optimizer state to another data-parallel size through DeepSpeed's universal checkpoint.

DeepSpeed 0.19 refuses ZeRO 1/2 optimizer shards saved at another data-parallel size. Its way
across is the universal checkpoint: `deepspeed.checkpoint.ds_to_universal` merges every
parameter's fp32 master weight, Adam moments and step from all shards into one file per state,
and an engine configured with `"checkpoint": {"load_universal": true}` cuts its own partition
from those. This module makes that conversion work for this framework's checkpoints
(docs/checkpoints.md, "Loading into a run"):
- DeepSpeed's converter takes a folder with layer files for Megatron's layout and insists on a
  `layer_01*` file, which ours never has (layer 1 is weightless). The universal folder needs no
  layer files (weights come from the fp32 masters), so it converts from a staging folder that
  holds only the engine files and optimizer shards.
- It merges tensor-parallel slices by rules that Megatron-DeepSpeed passes in
  `universal_checkpoint_info`: which parameters are replicated (taken from one rank) and which
  are row-parallel (joined on dim 1; the rest on dim 0). Ours follow `layout`'s tables, so the
  staging copies of the engine files carry that info, computed here for any of our checkpoints.

The result lives in SAVE/global_stepN/universal: reused when present, pruned with its checkpoint,
removed when a save writes that tag again (`save_checkpoint`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron.checkpointing import layout
from megatron.checkpointing.errors import CheckpointError
from megatron.checkpointing.reader import ENGINE_FILE, CheckpointReader
from megatron.checkpointing.safe_load import load_file

FOLDER = "universal"


def folder(reader: CheckpointReader) -> Path:
    return reader.path / FOLDER


def zero_stage(reader: CheckpointReader) -> int:
    """The ZeRO stage the checkpoint was saved with (DeepSpeed stores its config in the engine file)."""
    return int((reader.client.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))


def checkpoint_info(param_names: list[str]) -> dict[str, Any]:
    """How ds_to_universal joins each parameter's tensor-parallel slices, by `layout`'s rules.
    Exact names, because the converter (strict) refuses a pattern that matches nothing."""
    from deepspeed.checkpoint import constants as c

    def split_key(name: str) -> str:  # "2.attention.dense.weight" (pipe), "layers.1.attention..." (plain)
        return next((k for k in (*layout.COLUMN, *layout.ROW_WEIGHT) if name.endswith("." + k)), "")

    exact = [re.escape(n) + "$" for n in param_names]
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        # Neither column- nor row-parallel: norms, row-parallel biases, position embeddings.
        c.TP_REPLICATED_PARAMETER_PATTERNS: [p for n, p in zip(param_names, exact) if not split_key(n)],
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [p for n, p in zip(param_names, exact)
                                                   if split_key(n) in layout.ROW_WEIGHT],
        # A tied embedding sits on the first and the last pipeline stage with the same state
        # (the engine all-reduces its gradient): the converter takes the first stage's.
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [r"tied_modules\."],
    }


def _stage(reader: CheckpointReader, staging: Path) -> None:
    """Engine files with `checkpoint_info` added, and links to the optimizer shards."""
    from deepspeed.checkpoint.constants import PARAM_SHAPES, UNIVERSAL_CHECKPOINT_INFO

    staging.mkdir()
    for f in sorted(reader.path.iterdir()):
        if ENGINE_FILE.match(f.name):
            state = load_file(f, reader.allow_unsafe)
            names = [n for group in state[PARAM_SHAPES] for n in group]
            torch.save({**state, UNIVERSAL_CHECKPOINT_INFO: checkpoint_info(names)}, staging / f.name)
        elif f.name.endswith("optim_states.pt"):
            (staging / f.name).symlink_to(f.resolve())


def convert(reader: CheckpointReader) -> Path:
    """Write SAVE/global_stepN/universal unless it is there. Built in a temporary folder and
    renamed into place, so a folder found there is complete."""
    from deepspeed.checkpoint import ds_to_universal

    target = folder(reader)
    if target.is_dir():
        return target
    work = Path(tempfile.mkdtemp(prefix=".universal-", dir=reader.path))
    try:
        _stage(reader, work / "in")
        # The converter writes `latest_universal` beside its output folder: inside `work`.
        out = work / "out" / FOLDER
        args = argparse.Namespace(input_folder=str(work / "in"), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        log = io.StringIO()  # its progress bars and prints; shown only when it fails
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except (AssertionError, RuntimeError, ValueError, OSError, KeyError) as err:
            raise CheckpointError(f"DeepSpeed's universal conversion of {reader.path} failed: "
                                  f"{type(err).__name__}: {err}\n{log.getvalue()[-2000:]}") from err
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def prepare(reader: CheckpointReader) -> Path:
    """The universal folder on every rank: global rank 0 converts, the others wait and share
    its outcome (an error on rank 0 becomes the same error everywhere, not a hung barrier)."""
    if not dist.is_initialized():
        return convert(reader)
    outcome: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            convert(reader)
        except CheckpointError as err:
            outcome[0] = str(err)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])
    return folder(reader)
