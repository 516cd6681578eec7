"""Reading a checkpoint of any layout, one whole (tensor-parallel-merged) layer at a time.

Reads this framework's checkpoints and GPT-NeoX's (released 20B files with the old names and
`inv_freq`, current ones with linear1/linear2), in the pipeline layout (one file per layer and
tensor rank) or the plain one (one `mp_rank_YY_model_states.pt` per tensor rank holding the
whole module). Files are memory-mapped and read through `safe_load`, so walking the layers of a
20B checkpoint holds about one layer in memory. The rules are in `layout` and
docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import re
import zipfile
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron.checkpointing import layout
from megatron.checkpointing.errors import CheckpointError
from megatron.checkpointing.safe_load import load_file
from megatron.config.schema import ModelConfig

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
ENGINE_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
ZERO3_FILE = re.compile(r"^zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt$")  # ZeRO 3 keeps no mp_rank files
TAG = re.compile(r"^global_step(\d+)$")
# Written into every checkpoint this framework saves; a file without it is GPT-NeoX's.
FORMAT = {"name": "gpt-neox-rebuilt", "version": 1, "row_parallel_bias": layout.REPLICATED}
MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def describe(model: ModelConfig, vocab_size: int | None, padded_vocab_size: int | None) -> dict[str, Any]:
    """What a checkpoint says about itself: the format marker and the architecture."""
    return {"format": dict(FORMAT), "model_config": dataclasses.asdict(model),
            "vocab_size": vocab_size, "padded_vocab_size": padded_vocab_size}


def list_tags(load_dir: Path) -> list[str]:
    """The checkpoint folders in `load_dir`, newest first."""
    found = [p.name for p in load_dir.glob("global_step*") if p.is_dir() and TAG.match(p.name)]
    return sorted(found, key=lambda name: int(TAG.match(name).group(1)), reverse=True)


def resolve_tag(load_dir: Path, iteration: int | None) -> str:
    if not load_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {load_dir} does not exist")
    if iteration is not None:
        tag = f"global_step{iteration}"
    else:
        marker = load_dir / "latest"
        if not marker.is_file():
            raise CheckpointError(f"{load_dir}: no `latest` file; pass the iteration to read")
        try:
            tag = marker.read_text().strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{marker} does not hold a checkpoint tag (binary content): write the tag to "
                                  "resume, e.g. global_step1000") from None
    if not (load_dir / tag).is_dir():
        found = sorted(p.name for p in load_dir.glob("global_step*") if p.is_dir())
        named = f"{load_dir / 'latest'} names {tag!r} but " if iteration is None else ""
        raise CheckpointError(f"{named}{load_dir / tag} does not exist (found: {', '.join(found) or 'no checkpoints'})")
    return tag


class CheckpointReader:
    """One checkpoint directory (`load_dir` with `latest`, or `load_dir/global_stepN`)."""

    def __init__(self, load_dir: str | Path, iteration: int | None = None, allow_unsafe: bool = False) -> None:
        self.root = Path(load_dir)
        self.tag = resolve_tag(self.root, iteration)
        self.path = self.root / self.tag
        self.allow_unsafe = allow_unsafe
        files = sorted(p.name for p in self.path.iterdir())
        self._layer_files: dict[int, dict[int, str]] = {}
        for name in files:
            if m := LAYER_FILE.match(name):
                self._layer_files.setdefault(int(m.group(1)), {})[int(m.group(2))] = name
        engine_ranks = sorted(int(m.group(1)) for name in files if (m := ENGINE_FILE.match(name)))
        zero3_ranks = sorted(int(m.group(1)) for name in files if (m := ZERO3_FILE.match(name)))
        if self._layer_files:
            self.layout = "pipe"
            ranks = self._layer_files[min(self._layer_files)]
            self.tp = len(ranks)
            for number, found in self._layer_files.items():
                if sorted(found) != list(range(self.tp)):
                    missing = [layout.layer_file(number, r) for r in range(self.tp) if r not in found]
                    raise CheckpointError(f"{self.path}: missing {', '.join(missing)}")
        elif engine_ranks:
            self.layout = "plain"
            self.tp = len(engine_ranks)
        elif zero3_ranks:  # the plain engine with ZeRO 3: weights are partitioned over data ranks
            self.layout = "zero3"
            self.tp = len(zero3_ranks)
        else:
            raise CheckpointError(f"{self.path}: no model files (layer_XX-model_YY-model_states.pt "
                                  "or mp_rank_YY_model_states.pt)")
        if not engine_ranks and self.layout == "pipe":
            raise CheckpointError(f"{self.path}: no {layout.engine_file(0)} (engine and client state)")
        self._plain_modules: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self.numbers, self.tied = self._numbering()
        self.num_layers = (self.numbers[-1] if self.tied else self.numbers[-2]) - 3

    # -- what the files say --------------------------------------------------------------
    @cached_property
    def client(self) -> dict[str, Any]:
        """Engine and client state of model-parallel rank 0, without the module."""
        state = self._engine_state(0)
        return {k: v for k, v in state.items() if k != "module"}

    @property
    def is_ours(self) -> bool:
        # Checkpoints saved before the marker existed are recognised by our client state.
        legacy = "consumed_samples" in self.client and "tensor_parallel" in self.client.get("rng", {})
        return self.client.get("format", {}).get("name") == FORMAT["name"] or legacy

    @property
    def iteration(self) -> int:
        value = self.client.get("iteration", self.client.get("total_iters"))
        return int(value) if value is not None else int(TAG.match(self.tag).group(1))

    @property
    def pipe_parallel_size(self) -> int:
        """Stages of the run that wrote it (0 for the plain layout)."""
        if self.layout != "pipe":
            return 0
        dims = self.client.get("checkpoint_parallel_dimensions") or {}
        return int(dims.get("pp_degree", self.client.get("mp_world_size", self.tp) // self.tp))

    def verify(self) -> None:
        """Every .pt file must be a complete zip archive (torch.save's format). Reading only the
        central directory at each file's end catches truncated copies cheaply, and names the file."""
        for f in sorted(self.path.glob("*.pt")):
            try:
                zipfile.ZipFile(f).close()
            except (zipfile.BadZipFile, OSError) as err:
                raise CheckpointError(f"{f}: not a complete PyTorch checkpoint file (truncated or corrupt: {err})") from None

    @property
    def has_optimizer_state(self) -> bool:
        # ZeRO 0 keeps the optimizer in the engine file, ZeRO >= 1 in *optim_states.pt shards
        return any(self.path.glob("*optim_states.pt")) or self.client.get("optimizer") is not None

    def stored_config(self) -> dict[str, Any]:
        """The YAML files in configs/, merged in name order (keys normalised to underscores)."""
        merged: dict[str, Any] = {}
        for f in sorted((self.path / "configs").glob("*")):
            if f.suffix in (".yml", ".yaml", ".json"):
                try:
                    tree = yaml.safe_load(f.read_text()) or {}
                except yaml.YAMLError as err:
                    raise CheckpointError(f"{f}: not valid YAML: {err}") from None
                if isinstance(tree, dict):
                    merged.update({str(k).replace("-", "_"): v for k, v in tree.items()})
        return merged

    def model_config(self) -> tuple[ModelConfig, int | None]:
        """The architecture and the tokenizer's vocabulary size (None when unknown): from our
        client state, else from the stored configs."""
        if "model_config" in self.client:
            return ModelConfig(**self.client["model_config"]), self.vocab_size()
        stored = self.stored_config()
        if not stored:
            raise CheckpointError(f"{self.path}: no configs/ folder and no model description; pass the "
                                  "model's YAML config (--config)")
        return ModelConfig(**{k: v for k, v in stored.items() if k in MODEL_KEYS}), self.vocab_size()

    def vocab_size(self) -> int | None:
        """The tokenizer's size: stored by this framework, else from the tokenizer the stored
        config names when its files are here; None when unknown (padding then stays)."""
        if self.client.get("vocab_size"):
            return int(self.client["vocab_size"])
        stored = self.stored_config()
        if "tokenizer_type" not in stored:
            return None
        from megatron.tokenizer import build_tokenizer

        try:
            return build_tokenizer(stored["tokenizer_type"], stored.get("vocab_file"), stored.get("merge_file")).vocab_size
        except (FileNotFoundError, ValueError):
            return None

    def row_bias(self, parallel_residual: bool) -> str:
        """How the file's row-parallel biases combine across tensor ranks (see `layout`)."""
        if self.is_ours:
            return self.client.get("format", FORMAT)["row_parallel_bias"]
        return layout.SUMMED if parallel_residual else layout.REPLICATED

    # -- tensors --------------------------------------------------------------------------
    def layer_shards(self, number: int) -> list[dict[str, torch.Tensor]]:
        """Layer `number`'s state dict per tensor rank, as stored (names not mapped)."""
        if self.layout == "zero3":
            raise CheckpointError(f"{self.path}: a ZeRO stage 3 checkpoint, whose weights are partitioned over "
                                  "data-parallel ranks: resume it at the layout it was saved with, or gather it "
                                  "with DeepSpeed's zero_to_fp32.py first")
        if self.layout == "pipe":
            if number not in self._layer_files:
                raise CheckpointError(f"{self.path}: no files for layer {number}")
            return [load_file(self.path / self._layer_files[number][r], self.allow_unsafe) for r in range(self.tp)]
        return [self._plain_layers(r).get(number, {}) for r in range(self.tp)]

    def layer(self, number: int, parallel_residual: bool, model: ModelConfig | None = None) -> dict[str, torch.Tensor]:
        """Layer `number` whole: canonical names, shards merged, derived buffers dropped.

        model: the architecture, whose fused tensors (gated MLP, grouped-query attention) merge
        block by block; the stored one when None (one without a stored config merges as plain)."""
        shards = self.layer_shards(number)
        rule = self.row_bias(parallel_residual)
        if model is None:
            try:
                model = self.model_config()[0]
            except CheckpointError:
                model = ModelConfig()  # nothing stored: the multi-head, ungated layout
        merged = {}
        for key in shards[0]:
            name = layout.canonical_key(key)
            if name is not None:
                merged[name] = layout.merge(name, [s[key] for s in shards], rule, model)
        return merged

    # -- internals ------------------------------------------------------------------------
    def _engine_state(self, rank: int) -> dict[str, Any]:
        name = f"zero_pp_rank_0_mp_rank_{rank:02d}_model_states.pt" if self.layout == "zero3" else layout.engine_file(rank)
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(f"{self.path}: missing {path.name}")
        state = load_file(path, self.allow_unsafe)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of engine state, found {type(state).__name__}")
        return state

    def _plain_layers(self, rank: int) -> dict[int, dict[str, torch.Tensor]]:
        """Our `layers.K.` keys (module index K) or GPT-NeoX's `sequential.N.` (layer number N)."""
        if rank not in self._plain_modules:
            module = self._engine_state(rank).get("module")
            if not isinstance(module, dict):
                raise CheckpointError(f"{self.path / layout.engine_file(rank)}: no module weights")
            by_index: dict[int, dict[str, torch.Tensor]] = {}
            ours = any(k.startswith("layers.") for k in module)
            for key, tensor in module.items():
                prefix, index, rest = key.split(".", 2)
                by_index.setdefault(int(index), {})[rest] = tensor
            if ours:  # module index -> layer number: 0 -> 0, 1..L -> 2..L+1, then norm, output
                count = len(by_index)
                tied = not any("final_linear.weight" in d for d in by_index.values())
                L = count - 2 if tied else count - 3
                by_index = {(k if k == 0 else k + 1 if k <= L else k + 2): v for k, v in by_index.items()}
            self._plain_modules[rank] = by_index
        return self._plain_modules[rank]

    def _numbering(self) -> tuple[list[int], bool]:
        if self.layout == "zero3":  # no per-layer tensors to count: the stored description says
            model, _ = self.model_config()
            return layout.layer_numbers(model.num_layers, not model.no_weight_tying), not model.no_weight_tying
        numbers = sorted(self._layer_files) if self.layout == "pipe" else sorted(self._plain_layers(0))
        if len(numbers) < 3 or numbers[0] != 0:
            raise CheckpointError(f"{self.path}: layers {numbers} do not form a GPT-NeoX layer list")
        tied = numbers[-1] - numbers[-2] == 2  # ... L+1, L+3: no output layer of its own
        return numbers, tied
