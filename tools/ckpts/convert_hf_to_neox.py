#!/usr/bin/env python
"""Convert a Hugging Face `GPTNeoXForCausalLM` or `LlamaForCausalLM` (config.json model_type
gpt_neox, llama, or mistral without a sliding window) directory to a checkpoint to fine-tune from.

    python tools/ckpts/convert_hf_to_neox.py --input HF_DIR --output SAVE_DIR --tp 2 --pp 2 [--dtype bf16]
    python deepy.py train.py SAVE_DIR/model.yml my_data.yml

Reads config.json and the safetensors weights tensor by tensor (`safe_open`; one layer in
memory at a time) and writes SAVE_DIR/latest + global_step0 at TP x PP (`--pp 0`: the plain
layout), plus SAVE_DIR/model.yml: the architecture under GPT-NeoX's key names, the parallel
layout, the tokenizer (HF_DIR/tokenizer.json when it has GPT-NeoX's <|endoftext|>, else a
SentencePiece HF_DIR/tokenizer.model; copied beside it), `load: SAVE_DIR` and
`finetune: true`. The same YAML is stored in the checkpoint's configs/. my_data.yml adds the
data, batch, optimizer and `save` keys (a later file overrides model.yml, e.g. seq_length).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.checkpointing import hf, hf_llama, layout  # noqa: E402
from megatron.checkpointing.errors import CheckpointError  # noqa: E402
from megatron.checkpointing.writer import write_checkpoint  # noqa: E402
from megatron.config.schema import ModelConfig  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402

# What model.yml states about a GPT-NeoX model (GPT-NeoX's names); the rest keeps its defaults.
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "seq_length",
                     "max_position_embeddings", "vocab_size", "norm", "layernorm_epsilon", "pos_emb", "rotary_pct",
                     "rotary_emb_base", "no_weight_tying", "gpt_j_residual", "activation", "bias_gelu_fusion",
                     "hidden_dropout", "attention_dropout")
# The tokenizer files of a save_pretrained directory our tokenizers read, in order of preference.
TOKENIZER_FILES = (("tokenizer.json", "HFTokenizer"), ("tokenizer.model", "SPMTokenizer"))


def find_tokenizer(hf_dir: Path) -> tuple[str | None, str | None, int | None, str]:
    """(file name, tokenizer_type, entries) of the first tokenizer file in HF_DIR our tokenizers
    can use, else Nones and why none."""
    reasons = []
    for name, kind in TOKENIZER_FILES:
        path = hf_dir / name
        if not path.is_file():
            continue
        try:
            return name, kind, build_tokenizer(kind, str(path)).vocab_size, ""
        except (ValueError, ImportError) as err:
            reasons.append(str(err))
    return None, None, None, "; ".join(reasons) or f"{hf_dir} has no tokenizer.json or tokenizer.model"


def run_config(model: ModelConfig, keys: tuple[str, ...], tp: int, pp: int, save: Path,
               tokenizer: tuple[str, Path] | None, source: Path, why: str) -> str:
    """model.yml: enough, with the user's data config, for `deepy.py train.py` to fine-tune.
    keys: the architecture keys to state; tokenizer: (tokenizer_type, vocab_file) or None."""
    values = {key: getattr(model, key) for key in keys}
    values.update(model_parallel_size=tp, pipe_parallel_size=pp)
    if tokenizer is not None:
        values.update(tokenizer_type=tokenizer[0], vocab_file=str(tokenizer[1]))
    values.update(load=str(save), finetune=True)
    lines = [f"# Converted from {source} by tools/ckpts/convert_hf_to_neox.py. Fine-tune with:",
             f"#   python deepy.py train.py {save / 'model.yml'} my_data.yml"]
    if tokenizer is None:
        lines.append(f"# No tokenizer here ({why}): set tokenizer_type and vocab_file to one with "
                     f"{model.vocab_size} entries.")
    return "\n".join(lines) + "\n" + yaml.safe_dump(values, sort_keys=False)


def convert(args: argparse.Namespace) -> str:
    if args.tp < 1 or args.pp < 0:
        raise CheckpointError(f"--tp must be >= 1 and --pp >= 0 (got {args.tp}, {args.pp})")
    source, save = Path(args.input).resolve(), Path(args.output).resolve()
    llama = hf.model_type(source) in hf_llama.MODEL_TYPES  # hf.read_hf_config refuses other types
    family = hf_llama if llama else hf
    hc = family.read_hf_config(source)
    model = family.model_from_hf(hc)
    for what, count in (("attention heads", model.num_attention_heads), ("key/value heads", model.num_kv_heads)):
        if count and count % args.tp:
            raise CheckpointError(f"--tp {args.tp} does not divide the {count} {what}")
    files = hf.hf_weight_files(source)
    name, kind, vocab, why = find_tokenizer(source)
    if vocab is not None and vocab > hc.vocab_size:
        raise CheckpointError(f"{source / name} has {vocab} entries but the embedding only {hc.vocab_size} rows")
    # Rows beyond the tokenizer's entries are padding: the writer pads again for --tp.
    model = dataclasses.replace(model, vocab_size=vocab or hc.vocab_size)
    tied = not model.no_weight_tying
    read = (hf_llama.read_hf_layers(files, model) if llama
            else hf.read_hf_layers(files, model.num_layers, tied))
    layers = tqdm(read, desc="layers", unit="layer", total=len(layout.layer_numbers(model.num_layers, tied)),
                  file=sys.stderr)
    tokenizer = (kind, save / name) if name is not None else None
    keys = hf_llama.ARCHITECTURE_KEYS if llama else ARCHITECTURE_KEYS
    text = run_config(model, keys, args.tp, args.pp, save, tokenizer, source, why)
    out = write_checkpoint(save, 0, layers, model, model.vocab_size, args.tp, args.pp,
                           dtype=hf.DTYPES.get(args.dtype), config_files={"model.yml": text})
    if name is not None:
        shutil.copyfile(source / name, save / name)
    (save / "model.yml").write_text(text)
    note = "" if tokenizer else f"\nno tokenizer ({why}): set tokenizer_type and vocab_file in your config"
    return (f"wrote {out} (TP {args.tp} x {'plain' if args.pp == 0 else f'PP {args.pp}'}) and {save / 'model.yml'}; "
            f"fine-tune with: python deepy.py train.py {save / 'model.yml'} my_data.yml{note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="Hugging Face model directory (config.json, *.safetensors)")
    parser.add_argument("--output", required=True, help="checkpoint directory to write (gets `latest`, model.yml)")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size to write")
    parser.add_argument("--pp", type=int, required=True, help="pipeline stages to write; 0 = plain layout")
    parser.add_argument("--dtype", choices=hf.DTYPES, help="convert floating-point weights (default: as stored)")
    args = parser.parse_args(argv)
    try:
        print(convert(args))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
