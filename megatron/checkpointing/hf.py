"""Hugging Face `GPTNeoXForCausalLM` <-> this framework: the one name
mapping and the one config mapping, used by the converters (tools/ckpts/convert_*.py) and by
`to_hf_model` (tests and benchmarks that compare against transformers).

Weights map one to one: the fused QKV rows are grouped per head in both, so only the names
differ. Rotary `inv_freq` buffers (and the causal-mask buffers older transformers saved) are
derived, never mapped. transformers 5 holds the output layer as `lm_head` in memory and writes
it as `embed_out.weight`; both names are read. config.json keeps rotary in `rope_parameters`
{partial_rotary_factor, rope_theta}; `GPTNeoXConfig` also reads the older top-level
`rotary_pct` / `rotary_emb_base`.

Files stream: `SafetensorsShards` writes whole layers into shards of bounded size, and
`read_hf_layers` reads one layer's tensors at a time (`TensorFiles`, through `safe_open`), so
converting holds about one layer (or one shard) in memory, never the model. hf_llama.py (the
`LlamaForCausalLM` mapping) streams through the same two.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron.checkpointing import layout
from megatron.checkpointing.errors import CheckpointError
from megatron.checkpointing.loading import local_layers
from megatron.checkpointing.writer import Layer
from megatron.config.schema import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.tokenizer.tokenizer import EOD_TOKEN, PAD_TOKEN

EMBED, FINAL_NORM, LAYERS = "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.", "gpt_neox.layers."
OUTPUT_ON_DISK, OUTPUT_IN_MEMORY = "embed_out.weight", "lm_head.weight"
TRANSFORMER_KEYS = tuple(f"{module}.{param}" for module in (
    "input_layernorm", "post_attention_layernorm", "attention.query_key_value", "attention.dense",
    "mlp.dense_h_to_4h", "mlp.dense_4h_to_h") for param in ("weight", "bias"))
DERIVED = ("attention.rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
# transformers' names of the tanh GELU (one function); "gelu" is the exact one.
TANH_GELU = ("gelu_fast", "gelu_new", "gelu_pytorch_tanh")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the converters' --dtype


# -- names --------------------------------------------------------------------------------
def layer_keys(number: int, num_layers: int) -> tuple[str, ...]:
    """Our names of the weights layer `number` must hold."""
    if number == 0:
        return ("word_embeddings.weight",)
    if 2 <= number < num_layers + 2:
        return TRANSFORMER_KEYS
    if number == layout.final_norm_number(num_layers):
        return ("norm.weight", "norm.bias")
    if number == layout.output_number(num_layers):
        return ("final_linear.weight",)
    return ()


def hf_name(number: int, key: str, num_layers: int, in_memory: bool = False) -> str:
    """transformers' name of our weight `key` of layer `number` (as saved, or as in memory)."""
    if key not in layer_keys(number, num_layers):
        raise CheckpointError(f"layer {number} {key}: GPTNeoXForCausalLM has no such weight")
    if number == 0:
        return EMBED
    if number == layout.final_norm_number(num_layers):
        return FINAL_NORM + key.removeprefix("norm.")
    if number == layout.output_number(num_layers):
        return OUTPUT_IN_MEMORY if in_memory else OUTPUT_ON_DISK
    return f"{LAYERS}{number - 2}.{key}"


def our_name(name: str, num_layers: int) -> tuple[int, str] | None:
    """(layer number, our key) of a transformers weight name; None for a derived buffer."""
    bare = name.removeprefix("gpt_neox.")  # a bare GPTNeoXModel saves without the prefix
    if bare == "embed_in.weight":
        return 0, "word_embeddings.weight"
    if name in (OUTPUT_ON_DISK, OUTPUT_IN_MEMORY):
        return layout.output_number(num_layers), "final_linear.weight"
    if bare in ("final_layer_norm.weight", "final_layer_norm.bias"):
        return layout.final_norm_number(num_layers), "norm." + bare.rsplit(".", 1)[1]
    index, _, key = bare.removeprefix("layers.").partition(".")
    if bare.startswith("layers.") and index.isdigit() and int(index) < num_layers:
        if key in DERIVED:
            return None
        if key in TRANSFORMER_KEYS:
            return 2 + int(index), key
    raise CheckpointError(f"{name}: not a weight of a {num_layers}-layer GPTNeoXForCausalLM")


def to_hf_layer(number: int, tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """One whole layer (canonical names, as `CheckpointReader.layer` gives it) under saved names."""
    return {hf_name(number, key, num_layers): tensor for key, tensor in tensors.items()}


def to_hf_state_dict(model: GPTModel, num_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """Our (single-process) model's weights under transformers' in-memory names."""
    sd = {hf_name(number, key, num_layers, in_memory=True): value
          for number, module in local_layers(model)
          for key, value in module.state_dict().items() if layout.canonical_key(key) is not None}
    if tied:
        sd[OUTPUT_IN_MEMORY] = sd[EMBED]
    return sd


# -- configs ------------------------------------------------------------------------------
def check_expressible(model: ModelConfig) -> None:
    """Refuse what GPTNeoXForCausalLM cannot compute, naming the key and its value."""
    heads = model.num_attention_heads
    problems = [
        ("norm", model.norm != "layernorm", "it has LayerNorm only"),
        ("pos_emb", model.pos_emb != "rotary", "it has rotary position embeddings only"),
        ("activation", model.activation not in ("gelu", "relu"), "its MLP takes gelu or relu here"),
        ("num_kv_heads", model.num_kv_heads not in (None, heads), "it has no grouped-query attention"),
        ("use_bias_in_norms", not model.use_bias_in_norms, "its norms have biases"),
        ("use_bias_in_attn_linear", not model.use_bias_in_attn_linear, "its attention linears have biases"),
        ("use_bias_in_mlp", not model.use_bias_in_mlp, "its MLP linears have biases"),
    ]
    for key, bad, why in problems:
        if bad:
            raise CheckpointError(f"{key} {getattr(model, key)!r} cannot be converted to GPTNeoXForCausalLM: {why}")


def hf_config(model: ModelConfig, padded_vocab: int, ffn: int, max_positions: int, eod: int | None = None) -> Any:
    """The transformers config of the same architecture. padded_vocab: rows of the embedding
    matrices; eod: the tokenizer's end-of-text id (bos and eos), None when unknown."""
    from transformers import GPTNeoXConfig

    check_expressible(model)
    act = "relu" if model.activation == "relu" else "gelu_fast" if model.bias_gelu_fusion else "gelu"
    return GPTNeoXConfig(
        vocab_size=padded_vocab, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, intermediate_size=ffn,
        max_position_embeddings=max_positions, rotary_pct=model.rotary_pct, rotary_emb_base=model.rotary_emb_base,
        use_parallel_residual=model.gpt_j_residual, hidden_act=act, tie_word_embeddings=not model.no_weight_tying,
        layer_norm_eps=model.layernorm_epsilon, hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout, bos_token_id=eod, eos_token_id=eod,
    )


def model_from_hf(hc: Any) -> ModelConfig:
    """Our ModelConfig of a `GPTNeoXConfig`; refuses what our model cannot compute."""
    rope = dict(getattr(hc, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", 10000)  # transformers' defaults, as its model would run
    problems = [
        (hc.hidden_act not in ("gelu", "relu", *TANH_GELU), f"hidden_act {hc.hidden_act!r}: this framework has "
                                                             "gelu (exact or tanh) and relu"),
        (rope.get("rope_type", "default") != "default", f"rope_parameters.rope_type {rope.get('rope_type')!r}: "
                                                        "only plain rotary (rope_type 'default') is supported"),
        (float(theta) != int(theta), f"rope_parameters.rope_theta {theta!r}: rotary_emb_base must be an integer"),
        (not getattr(hc, "attention_bias", True), "attention_bias False: this framework's attention has biases"),
    ]
    for bad, message in problems:
        if bad:
            raise CheckpointError(f"{message}; this model cannot be converted")
    return ModelConfig(
        num_layers=hc.num_hidden_layers, hidden_size=hc.hidden_size, num_attention_heads=hc.num_attention_heads,
        intermediate_size=hc.intermediate_size, seq_length=hc.max_position_embeddings,
        max_position_embeddings=hc.max_position_embeddings, norm="layernorm", layernorm_epsilon=hc.layer_norm_eps,
        pos_emb="rotary", rotary_pct=rope.get("partial_rotary_factor", 0.25), rotary_emb_base=int(theta),
        no_weight_tying=not hc.tie_word_embeddings, gpt_j_residual=hc.use_parallel_residual,
        activation="relu" if hc.hidden_act == "relu" else "gelu", bias_gelu_fusion=hc.hidden_act in TANH_GELU,
        hidden_dropout=hc.hidden_dropout, attention_dropout=hc.attention_dropout,
    )


def model_type(hf_dir: Path) -> str | None:
    """config.json's `model_type` (which converter applies) of a local save_pretrained directory."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (expected a save_pretrained directory)")
    try:
        return json.loads(path.read_text()).get("model_type")
    except ValueError as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: {err}") from None


def read_hf_config(hf_dir: Path) -> Any:
    """config.json of a local directory (never the network), as a `GPTNeoXConfig`."""
    from transformers import GPTNeoXConfig

    kind = model_type(hf_dir)
    if kind != "gpt_neox":  # GPTNeoXConfig would read any config.json, and be wrong
        raise CheckpointError(f"{hf_dir / 'config.json'}: model_type {kind!r}; GPTNeoXForCausalLM (gpt_neox) "
                              "and LlamaForCausalLM (llama, mistral) convert")
    try:
        return GPTNeoXConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{hf_dir / 'config.json'}: {err}") from None


def write_tokenizer_config(out: Path, tokenizer_json: Path, max_positions: int) -> None:
    """tokenizer_config.json beside a tokenizers JSON so AutoTokenizer opens it offline."""
    vocab = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
    specials = {t["content"] for t in vocab}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions,
              "bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    if PAD_TOKEN in specials:
        config["pad_token"] = PAD_TOKEN
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# -- files --------------------------------------------------------------------------------
class SafetensorsShards:
    """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` and their index. Whole
    layers are added; a shard is written before the next layer would take it past `max_bytes`,
    so memory holds at most one shard (at least one layer), not the model."""

    def __init__(self, out: Path, max_bytes: int, dtype: torch.dtype | None = None) -> None:
        self.out, self.max_bytes, self.dtype = out, max_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[list[str]] = []  # names per written part
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.dtype is not None:
            tensors = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.pending.items()},
                  str(self.out / f"part{len(self.parts)}.safetensors"), metadata={"format": "pt"})
        self.parts.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Give the parts their final names; returns them."""
        if self.pending:
            self._flush()
        n = len(self.parts)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.out / f"part{i}.safetensors", self.out / name)
        if n > 1:
            weight_map = {key: name for name, keys in zip(names, self.parts) for key in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def hf_weight_files(hf_dir: Path) -> dict[str, Path]:
    """Every tensor name of a save_pretrained directory and the safetensors file holding it."""
    from safetensors import safe_open

    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    if (hf_dir / SINGLE_FILE).is_file():
        with safe_open(str(hf_dir / SINGLE_FILE), "pt") as f:
            return {name: hf_dir / SINGLE_FILE for name in f.keys()}
    found = sorted(p.name for p in hf_dir.glob("*.bin"))
    hint = f" (found {', '.join(found)}: load it and save_pretrained with safetensors)" if found else ""
    raise CheckpointError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


class TensorFiles:
    """Reads named tensors one at a time from the safetensors files `hf_weight_files` found,
    opening each file once; use as a context manager so the files close."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> "TensorFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), "pt"))
        return self._handles[path].get_tensor(name)


def read_hf_layers(files: dict[str, Path], num_layers: int, tied: bool) -> Iterator[Layer]:
    """Whole layers (our numbers and names) in order, each read tensor by tensor when reached."""
    where: dict[int, dict[str, str]] = {}
    for name in files:
        found = our_name(name, num_layers)
        if found is not None and not (tied and found[0] == layout.output_number(num_layers)):
            where.setdefault(found[0], {})[found[1]] = name
    with TensorFiles(files) as reader:
        for number in layout.layer_numbers(num_layers, tied):
            names = where.get(number, {})
            missing = [k for k in layer_keys(number, num_layers) if k not in names]
            if missing:
                raise CheckpointError(f"no tensor {hf_name(number, missing[0], num_layers)} in the weights")
            yield number, {key: reader.get(name) for key, name in names.items()}


def to_hf_model(model: ModelConfig, ours: GPTModel, padded_vocab: int, ffn: int, max_positions: int,
                attn_implementation: str) -> Any:
    """A `GPTNeoXForCausalLM` of the same architecture holding our (single-process) weights."""
    from transformers import GPTNeoXForCausalLM

    hc = hf_config(model, padded_vocab, ffn, max_positions)
    hc._attn_implementation = attn_implementation
    hf = GPTNeoXForCausalLM(hc)
    result = hf.load_state_dict(to_hf_state_dict(ours, model.num_layers, tied=not model.no_weight_tying),
                                strict=False)
    unmapped = [k for k in result.missing_keys if "inv_freq" not in k and "rotary" not in k]
    if result.unexpected_keys or unmapped:
        raise ValueError(f"weights do not map: unexpected {result.unexpected_keys}, missing {unmapped}")
    return hf
