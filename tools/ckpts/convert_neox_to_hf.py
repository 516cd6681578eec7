#!/usr/bin/env python
"""Convert a checkpoint to a Hugging Face `GPTNeoXForCausalLM` directory, or `LlamaForCausalLM`
for a Llama-shaped model (activation swiglu with rmsnorm), one layer at a time.

    python tools/ckpts/convert_neox_to_hf.py --input SAVE_DIR [--iteration N] [--config YML ...]
        --output HF_DIR [--dtype fp32|fp16|bf16] [--keep-padding] [--allow-unsafe]

SAVE_DIR is this framework's checkpoint or GPT-NeoX's (any tensor/pipeline layout). The
architecture comes from the checkpoint (our stored model description, else the YAML files in its
configs/) unless --config files are given; of those only the model and tokenizer keys are read,
so GPT-NeoX configs with keys this framework lacks are fine. The vocabulary size is the
tokenizer's (the one the config names, when its files exist), else the size our checkpoint
stored, else the embedding's rows; padding rows are dropped unless --keep-padding.

HF_DIR gets config.json, safetensors shards (layers are read, written and dropped one by one)
and the tokenizer: for an HFTokenizer run tokenizer.json, for an SPMTokenizer run tokenizer.model
(as transformers' LlamaTokenizer), each with tokenizer_config.json. It opens offline with
`AutoModelForCausalLM.from_pretrained(HF_DIR)` and `AutoTokenizer.from_pretrained(HF_DIR)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.checkpointing import hf, hf_llama, layout  # noqa: E402
from megatron.checkpointing.errors import CheckpointError  # noqa: E402
from megatron.checkpointing.loading import check_architecture  # noqa: E402
from megatron.checkpointing.reader import MODEL_KEYS, CheckpointReader  # noqa: E402
from megatron.config import ConfigError  # noqa: E402
from megatron.config.config import mlp_width  # noqa: E402
from megatron.config.loader import build_dataclass, merge_files  # noqa: E402
from megatron.config.schema import ModelConfig  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402
from megatron.tokenizer.tokenizer import AbstractTokenizer  # noqa: E402


def architecture(reader: CheckpointReader, configs: list[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """The model and the settings that name its tokenizer: from --config files, else stored."""
    if not configs:
        return reader.model_config()[0], reader.stored_config()
    settings, _, _ = merge_files(configs)
    model = build_dataclass(ModelConfig, {k: v for k, v in settings.items() if k in MODEL_KEYS},
                            where=f" (in {', '.join(configs)})")
    return model, settings


def tokenizer(settings: dict[str, Any]) -> tuple[AbstractTokenizer | None, str]:
    """The run's tokenizer, or None and why."""
    if "tokenizer_type" not in settings:
        return None, "the config names no tokenizer_type"
    try:
        return build_tokenizer(settings["tokenizer_type"], settings.get("vocab_file"), settings.get("merge_file")), ""
    except (FileNotFoundError, ValueError) as err:
        return None, str(err)


def fresh_output(path: Path) -> Path:
    """A temporary sibling of `path`, renamed to it when complete (never a half-written model)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path} exists and is not an empty directory; choose a new --output")
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write(reader: CheckpointReader, model: ModelConfig, tok: AbstractTokenizer | None, why: str,
          settings: dict[str, Any], tmp: Path, args: argparse.Namespace) -> tuple[int, list[str]]:
    """Weights, config and tokenizer files into `tmp`; returns (vocabulary rows, weight files)."""
    llama = hf_llama.is_llama(model)
    vocab = tok.vocab_size if tok else reader.client.get("vocab_size")
    dtype = hf.DTYPES.get(args.dtype)
    shards = hf.SafetensorsShards(tmp, int(args.max_shard_mb * 2**20), dtype)
    for number in tqdm(reader.numbers, desc="layers", unit="layer", file=sys.stderr):
        tensors = reader.layer(number, model.gpt_j_residual, model)
        for key in layout.VOCAB & tensors.keys():
            rows = tensors[key].shape[0]
            if vocab is not None and vocab > rows:
                raise CheckpointError(f"the tokenizer has {vocab} entries but {key} has only {rows} rows")
            vocab = rows if args.keep_padding or vocab is None else vocab
            tensors[key] = layout.resize_vocab(key, tensors[key], vocab)
        dtype = dtype or next(iter(tensors.values())).dtype
        shards.add(hf_llama.to_hf_layer(number, tensors, model) if llama
                   else hf.to_hf_layer(number, tensors, model.num_layers))
        del tensors  # the next layer replaces it: memory holds about one layer (or one shard)
    files = shards.close()
    max_positions = model.max_position_embeddings or model.seq_length  # as NeoXConfig.derived
    config = (hf_llama if llama else hf).hf_config(model, vocab, mlp_width(model), max_positions,
                                                   tok.eod if tok else None)
    config.dtype, config.architectures = dtype, ["LlamaForCausalLM" if llama else "GPTNeoXForCausalLM"]
    config.save_pretrained(str(tmp))
    if tok is not None and tok.name == "HFTokenizer":
        shutil.copyfile(settings["vocab_file"], tmp / "tokenizer.json")
        hf.write_tokenizer_config(tmp, tmp / "tokenizer.json", max_positions)
    elif tok is not None and tok.name == "SPMTokenizer":
        shutil.copyfile(settings["vocab_file"], tmp / "tokenizer.model")
        hf_llama.write_spm_tokenizer_config(tmp, tok, max_positions)
    elif tok is not None:
        print(f"tokenizer: {tok.name} has no Hugging Face tokenizer files; none written (eos/bos id {tok.eod})")
    else:
        print(f"tokenizer: none written, eos/bos ids unset ({why})")
    return vocab, files


def convert(args: argparse.Namespace) -> str:
    reader = CheckpointReader(args.input, args.iteration, args.allow_unsafe)
    model, settings = architecture(reader, args.config)
    (hf_llama if hf_llama.is_llama(model) else hf).check_expressible(model)  # first: what cannot convert is the news
    check_architecture(reader, model)
    # The files decide tying: a tied checkpoint has one matrix, which HF can tie as well.
    model = dataclasses.replace(model, no_weight_tying=not reader.tied)
    tok, why = tokenizer(settings)
    out = Path(args.output)
    tmp = fresh_output(out)
    try:
        vocab, files = write(reader, model, tok, why, settings, tmp, args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above); replace it with the complete directory
    os.replace(tmp, out)
    return (f"wrote {out}: {model.num_layers} layers, vocabulary {vocab}, {len(files)} safetensors file(s), "
            f"from {reader.path} (iteration {reader.iteration})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="checkpoint directory (with `latest`)")
    parser.add_argument("--iteration", type=int, help="read global_stepN instead of `latest`")
    parser.add_argument("--config", nargs="+", default=[], help="YAML files with the model's keys (default: stored)")
    parser.add_argument("--output", required=True, help="new Hugging Face model directory")
    parser.add_argument("--dtype", choices=hf.DTYPES, help="convert floating-point weights (default: as stored)")
    parser.add_argument("--keep-padding", action="store_true", help="keep the padded vocabulary rows")
    parser.add_argument("--max-shard-mb", type=float, default=2000.0,
                        help="start a new safetensors file before one would exceed this (whole layers)")
    parser.add_argument("--allow-unsafe", action="store_true", help="unpickle files that need more than data types")
    args = parser.parse_args(argv)
    try:
        print(convert(args))
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
