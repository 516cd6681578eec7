#!/usr/bin/env python
"""Convert a Hugging Face `GPTNeoXForCausalLM` directory to a checkpoint to fine-tune from.

    python tools/ckpts/convert_hf_to_neox.py --input HF_DIR --output SAVE_DIR --tp 2 --pp 2 [--dtype bf16]
    python deepy.py train.py SAVE_DIR/model.yml my_data.yml

Reads config.json and the safetensors weights tensor by tensor (`safe_open`; one layer in
memory at a time) and writes SAVE_DIR/latest + global_step0 at TP x PP (`--pp 0`: the plain
layout), plus SAVE_DIR/model.yml: the architecture under GPT-NeoX's key names, the parallel
layout, the tokenizer (HF_DIR/tokenizer.json, copied beside it), `load: SAVE_DIR` and
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

from megatron.checkpointing import hf, layout  # noqa: E402
from megatron.checkpointing.errors import CheckpointError  # noqa: E402
from megatron.checkpointing.writer import write_checkpoint  # noqa: E402
from megatron.config.schema import ModelConfig  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402

# What model.yml states about the model (GPT-NeoX's names); the rest keeps its defaults.
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "seq_length",
                     "max_position_embeddings", "vocab_size", "norm", "layernorm_epsilon", "pos_emb", "rotary_pct",
                     "rotary_emb_base", "no_weight_tying", "gpt_j_residual", "activation", "bias_gelu_fusion",
                     "hidden_dropout", "attention_dropout")


def tokenizer_size(hf_dir: Path) -> tuple[int | None, str]:
    """Entries of HF_DIR/tokenizer.json when our HFTokenizer can use it, else None and why."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None, f"{hf_dir} has no tokenizer.json"
    try:
        return build_tokenizer("HFTokenizer", str(path)).vocab_size, ""
    except ValueError as err:
        return None, str(err)


def run_config(model: ModelConfig, tp: int, pp: int, save: Path, tokenizer_file: Path | None, source: Path,
               why: str) -> str:
    """model.yml: enough, with the user's data config, for `deepy.py train.py` to fine-tune."""
    values = {key: getattr(model, key) for key in ARCHITECTURE_KEYS}
    values.update(model_parallel_size=tp, pipe_parallel_size=pp)
    if tokenizer_file is not None:
        values.update(tokenizer_type="HFTokenizer", vocab_file=str(tokenizer_file))
    values.update(load=str(save), finetune=True)
    lines = [f"# Converted from {source} by tools/ckpts/convert_hf_to_neox.py. Fine-tune with:",
             f"#   python deepy.py train.py {save / 'model.yml'} my_data.yml"]
    if tokenizer_file is None:
        lines.append(f"# No tokenizer here ({why}): set tokenizer_type and vocab_file to one with "
                     f"{model.vocab_size} entries.")
    return "\n".join(lines) + "\n" + yaml.safe_dump(values, sort_keys=False)


def convert(args: argparse.Namespace) -> str:
    if args.tp < 1 or args.pp < 0:
        raise CheckpointError(f"--tp must be >= 1 and --pp >= 0 (got {args.tp}, {args.pp})")
    source, save = Path(args.input).resolve(), Path(args.output).resolve()
    hc = hf.read_hf_config(source)
    model = hf.model_from_hf(hc)
    if model.num_attention_heads % args.tp:
        raise CheckpointError(f"--tp {args.tp} does not divide the {model.num_attention_heads} attention heads")
    files = hf.hf_weight_files(source)
    vocab, why = tokenizer_size(source)
    if vocab is not None and vocab > hc.vocab_size:
        raise CheckpointError(f"{source / 'tokenizer.json'} has {vocab} entries but the embedding only "
                              f"{hc.vocab_size} rows")
    # Rows beyond the tokenizer's entries are padding: the writer pads again for --tp.
    model = dataclasses.replace(model, vocab_size=vocab or hc.vocab_size)
    tied = not model.no_weight_tying
    layers = tqdm(hf.read_hf_layers(files, model.num_layers, tied), desc="layers", unit="layer",
                  total=len(layout.layer_numbers(model.num_layers, tied)), file=sys.stderr)
    tokenizer_file = save / "tokenizer.json" if vocab is not None else None
    text = run_config(model, args.tp, args.pp, save, tokenizer_file, source, why)
    out = write_checkpoint(save, 0, layers, model, model.vocab_size, args.tp, args.pp,
                           dtype=hf.DTYPES.get(args.dtype), config_files={"model.yml": text})
    if tokenizer_file is not None:
        shutil.copyfile(source / "tokenizer.json", tokenizer_file)
    (save / "model.yml").write_text(text)
    note = "" if tokenizer_file else f"\nno tokenizer ({why}): set tokenizer_type and vocab_file in your config"
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
