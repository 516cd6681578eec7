"""Reading checkpoint files as data, never as code.

`torch.load(weights_only=True)` rebuilds tensors, containers and plain values only. The files
this framework reads need a few more types, all of them data: NumPy arrays and dtypes (the NumPy
RNG state that DeepSpeed's and GPT-NeoX's engine files carry) and `argparse.Namespace` (older
GPT-NeoX client state). Anything else a file asks to unpickle is refused with the file's name
and the types it wanted, unless the user opts in (`allow_unsafe`), because unpickling can run
arbitrary code (docs/checkpoints.md, "Safety").
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron.checkpointing.errors import CheckpointError

SAFE_GLOBALS: list[Any] = [
    np._core.multiarray._reconstruct, np.ndarray, np.dtype, argparse.Namespace,
    *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")),
]


def load_file(path: str | Path, allow_unsafe: bool = False) -> Any:
    """One `.pt` file, memory-mapped (tensors are read from disk when touched, so a tool that
    walks a checkpoint layer by layer holds about one layer in memory)."""
    path = Path(path)
    try:
        zipfile.ZipFile(path).close()  # a truncated copy fails here, with its name
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a complete PyTorch checkpoint file (truncated or corrupt: {err})") from None
    if allow_unsafe:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
        extra = sorted(set(wanted) - allowed) or wanted
        raise CheckpointError(
            f"{path}: loading it would unpickle {', '.join(extra)}, which could run code; if you "
            "trust the file, set allow_unsafe_checkpoint_load: true (tools: --allow-unsafe)"
        ) from None
