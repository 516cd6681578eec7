"""Hugging Face `LlamaForCausalLM` (and `MistralForCausalLM` whose sliding window never bites)
<-> this framework: the name mapping, the config mapping and the fused tensors, used by the
converters (tools/ckpts/convert_*.py) and by `to_hf_model` (tests and benchmarks).

Our layer fuses what Llama keeps apart (whole tensors are the one-process ones; megatron/
checkpointing/layout.py cuts them for tensor parallelism block by block):
- attention.query_key_value.weight: with num_kv_heads equal to the heads, GPT-NeoX's per-head
  rows [q_h; k_h; v_h] for every head; with grouped-query attention [q; k; v] (all query heads,
  then all key heads, then all value heads).
- mlp.dense_h_to_4h.weight: [values; gates], the MLP computing silu(gates) * values: Llama's
  down(silu(gate_proj(x)) * up_proj(x)), so values are up_proj and gates gate_proj.
RMSNorm's parameter is `scale` (GPT-NeoX's name), Llama's `weight`.

Rotary: HF's Llama rotates each head's halves (rotate_half) on q_proj / k_proj rows as stored,
which is GPT-NeoX's convention, so rows copy without a permutation (tests/checkpointing/
test_hf_llama.py checks it against transformers' logits). Our RMSNorm is F.rms_norm, the same
formula as LlamaRMSNorm (eps inside the square root).

The MLP width: Llama's intermediate_size is one half's width; GPT-NeoX's sizing rule
(config.mlp_width) gives exactly that width for intermediate_size = 3 x it, mlp_multiple_of 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron.checkpointing import layout
from megatron.checkpointing.errors import CheckpointError
from megatron.checkpointing.hf import TensorFiles
from megatron.checkpointing.loading import local_layers
from megatron.checkpointing.writer import Layer
from megatron.config.schema import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.tokenizer.tokenizer import SPMTokenizer

MODEL_TYPES = ("llama", "mistral")
EMBED, FINAL_NORM, OUTPUT, LAYERS = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers."
QKV, GATED = "attention.query_key_value.weight", "mlp.dense_h_to_4h.weight"
# Our key in a transformer layer -> Llama's names inside `model.layers.{i}.`, in the
# order our fused tensor holds them.
LAYER_PARTS = {
    "input_layernorm.scale": ("input_layernorm.weight",),
    "post_attention_layernorm.scale": ("post_attention_layernorm.weight",),
    QKV: ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attention.dense.weight": ("self_attn.o_proj.weight",),
    GATED: ("mlp.up_proj.weight", "mlp.gate_proj.weight"),
    "mlp.dense_4h_to_h.weight": ("mlp.down_proj.weight",),
}
DERIVED = ("self_attn.rotary_emb.inv_freq",)  # older transformers saved it; recomputed from the config
# What model.yml states about a converted Llama (GPT-NeoX's key names); the rest keeps its defaults.
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
                     "mlp_multiple_of", "seq_length", "max_position_embeddings", "vocab_size", "norm",
                     "rms_norm_epsilon", "pos_emb", "rotary_pct", "rotary_emb_base", "no_weight_tying",
                     "gpt_j_residual", "activation", "use_bias_in_norms", "use_bias_in_attn_linear",
                     "use_bias_in_mlp", "hidden_dropout", "attention_dropout")


def is_llama(model: ModelConfig) -> bool:
    """Whether our model is Llama-shaped (the converters then write LlamaForCausalLM)."""
    return model.activation == "swiglu" and model.norm == "rmsnorm"


def kv_heads(model: ModelConfig) -> int:
    """Key/value heads (num_kv_heads unset: one per query head)."""
    return model.num_kv_heads or model.num_attention_heads


# -- fused tensors ---------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv: int) -> torch.Tensor:
    """Our whole query_key_value weight of Llama's q_proj, k_proj, v_proj weights."""
    if kv != heads:
        return torch.cat([q, k, v])
    head_dim = q.shape[0] // heads
    return torch.stack([t.view(heads, head_dim, -1) for t in (q, k, v)], dim=1).reshape(3 * q.shape[0], -1)


def unfuse_qkv(fused: torch.Tensor, heads: int, kv: int) -> tuple[torch.Tensor, ...]:
    """q_proj, k_proj, v_proj weights of our whole query_key_value weight."""
    head_dim = fused.shape[0] // (heads + 2 * kv)
    if kv != heads:
        return tuple(t.contiguous() for t in fused.split([heads * head_dim, kv * head_dim, kv * head_dim]))
    per_head = fused.view(heads, 3, head_dim, -1)
    return tuple(per_head[:, i].reshape(heads * head_dim, -1) for i in range(3))


# -- names ----------------------------------------------------------------------------------
def hf_parts(number: int, num_layers: int) -> dict[str, tuple[str, ...]]:
    """Our keys of layer `number` -> the Llama weights each is made of, in our fused order."""
    if number == 0:
        return {"word_embeddings.weight": (EMBED,)}
    if 2 <= number < num_layers + 2:
        prefix = f"{LAYERS}{number - 2}."
        return {key: tuple(prefix + name for name in names) for key, names in LAYER_PARTS.items()}
    if number == layout.final_norm_number(num_layers):
        return {"norm.scale": (FINAL_NORM,)}
    if number == layout.output_number(num_layers):
        return {"final_linear.weight": (OUTPUT,)}
    return {}


def _fuse(key: str, tensors: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    if key == QKV:
        return fuse_qkv(*tensors, model.num_attention_heads, kv_heads(model))
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]  # [values; gates] or a single weight


def read_hf_layers(files: dict[str, Path], model: ModelConfig) -> Iterator[Layer]:
    """Whole layers (our numbers and keys) in order; each layer's tensors are read when it is
    reached, so memory holds about one layer."""
    num_layers, tied = model.num_layers, not model.no_weight_tying
    numbers = layout.layer_numbers(num_layers, tied)
    known = {name for n in [*numbers, layout.output_number(num_layers)] for names in hf_parts(n, num_layers).values()
             for name in names}
    for name in files:
        derived = name.startswith(LAYERS) and name.endswith(DERIVED)
        if name not in known and not derived:
            raise CheckpointError(f"{name}: not a weight of a {num_layers}-layer LlamaForCausalLM")
    with TensorFiles(files) as reader:
        for number in numbers:
            tensors = {}
            for key, names in hf_parts(number, num_layers).items():
                missing = [name for name in names if name not in files]
                if missing:
                    raise CheckpointError(f"no tensor {missing[0]} in the weights")
                tensors[key] = _fuse(key, [reader.get(name) for name in names], model)
            yield number, tensors


def to_hf_layer(number: int, tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """One whole layer (our keys, as `CheckpointReader.layer` gives it) under Llama's names."""
    parts = hf_parts(number, model.num_layers)
    extra = sorted(set(tensors) - set(parts))
    if extra:
        raise CheckpointError(f"layer {number} {extra[0]}: LlamaForCausalLM has no such weight")
    out = {}
    for key, names in parts.items():
        if key not in tensors:
            raise CheckpointError(f"layer {number} has no {key}")
        if key == QKV:
            out.update(zip(names, unfuse_qkv(tensors[key], model.num_attention_heads, kv_heads(model))))
        else:  # [values; gates] halves, or a single weight
            out.update(zip(names, (t.contiguous() for t in tensors[key].chunk(len(names)))))
    return out


# -- configs --------------------------------------------------------------------------------
def check_expressible(model: ModelConfig) -> None:
    """Refuse what LlamaForCausalLM cannot compute (or this converter does not write), naming
    the key and its value."""
    problems = [
        ("norm", model.norm != "rmsnorm", "it has RMSNorm only"),
        ("activation", model.activation != "swiglu", "its MLP is SwiGLU (silu-gated)"),
        ("pos_emb", model.pos_emb != "rotary", "it has rotary position embeddings only"),
        ("rotary_pct", model.rotary_pct != 1.0, "it rotates whole heads (rotary_pct 1)"),
        ("gpt_j_residual", model.gpt_j_residual, "it has the sequential residual only"),
        ("use_bias_in_norms", model.use_bias_in_norms, "its RMSNorm has no offset"),
        ("use_bias_in_attn_linear", model.use_bias_in_attn_linear, "the converted model has no attention biases"),
        ("use_bias_in_mlp", model.use_bias_in_mlp, "the converted model has no MLP biases"),
    ]
    for key, bad, why in problems:
        if bad:
            raise CheckpointError(f"{key} {getattr(model, key)!r} cannot be converted to LlamaForCausalLM: {why}")


def hf_config(model: ModelConfig, padded_vocab: int, ffn: int, max_positions: int, eod: int | None = None) -> Any:
    """The `LlamaConfig` of the same architecture. padded_vocab: rows of the embedding matrices;
    ffn: the MLP width (one half of the gated MLP); eod: the tokenizer's end-of-text id (bos and
    eos), None when unknown."""
    from transformers import LlamaConfig

    check_expressible(model)
    return LlamaConfig(
        vocab_size=padded_vocab, hidden_size=model.hidden_size, intermediate_size=ffn,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=kv_heads(model),
        head_dim=model.hidden_size // model.num_attention_heads, hidden_act="silu",
        max_position_embeddings=max_positions, rms_norm_eps=model.rms_norm_epsilon,
        tie_word_embeddings=not model.no_weight_tying, attention_bias=False, mlp_bias=False,
        rope_theta=float(model.rotary_emb_base),  # transformers 5 files it under rope_parameters
        attention_dropout=model.attention_dropout, bos_token_id=eod, eos_token_id=eod,
    )


def model_from_hf(hc: Any) -> ModelConfig:
    """Our ModelConfig of a `LlamaConfig` / `MistralConfig`; refuses what our model cannot compute."""
    # transformers 5 keeps rotary in rope_parameters; 4.x in rope_theta and rope_scaling.
    rope = dict(getattr(hc, "rope_parameters", None) or getattr(hc, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(hc, "rope_theta", 10000))
    rope.setdefault("rope_type", rope.get("type", "default"))
    heads, kv_heads = hc.num_attention_heads, hc.num_key_value_heads or hc.num_attention_heads
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // heads
    window = getattr(hc, "sliding_window", None)
    problems = [
        (hc.hidden_act != "silu", f"hidden_act {hc.hidden_act!r}: this framework's gated MLP here is SwiGLU (silu)"),
        (rope.get("rope_type", "default") != "default", f"rope_parameters.rope_type {rope.get('rope_type')!r}: "
                                                        "only plain rotary (rope_type 'default') is supported"),
        (float(theta) != int(theta), f"rope_parameters.rope_theta {theta!r}: rotary_emb_base must be an integer"),
        (getattr(hc, "attention_bias", False), "attention_bias True: the converted model has no attention biases"),
        (getattr(hc, "mlp_bias", False), "mlp_bias True: the converted model has no MLP biases"),
        (head_dim * heads != hc.hidden_size, f"head_dim {head_dim} x {heads} heads is not hidden_size "
                                             f"{hc.hidden_size}: this framework derives head_dim"),
        (window is not None and window < hc.max_position_embeddings,
         f"sliding_window {window}: this framework's attention is full causal attention"),
    ]
    for bad, message in problems:
        if bad:
            raise CheckpointError(f"{message}; this model cannot be converted")
    return ModelConfig(
        num_layers=hc.num_hidden_layers, hidden_size=hc.hidden_size, num_attention_heads=heads,
        num_kv_heads=None if kv_heads == heads else kv_heads, intermediate_size=3 * hc.intermediate_size,
        mlp_multiple_of=1, seq_length=hc.max_position_embeddings, max_position_embeddings=hc.max_position_embeddings,
        norm="rmsnorm", rms_norm_epsilon=hc.rms_norm_eps, pos_emb="rotary", rotary_pct=1.0,
        rotary_emb_base=int(theta), no_weight_tying=not hc.tie_word_embeddings, gpt_j_residual=False,
        activation="swiglu", use_bias_in_norms=False, use_bias_in_attn_linear=False, use_bias_in_mlp=False,
        hidden_dropout=0.0, attention_dropout=float(hc.attention_dropout),
    )


def read_hf_config(hf_dir: Path) -> Any:
    """config.json of a local llama / mistral directory (never the network)."""
    from transformers import AutoConfig

    path = hf_dir / "config.json"
    try:
        kind = json.loads(path.read_text()).get("model_type")
        if kind not in MODEL_TYPES:
            raise CheckpointError(f"{path}: model_type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
        return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: {err}") from None


def write_spm_tokenizer_config(out: Path, tok: SPMTokenizer, max_positions: int) -> None:
    """tokenizer_config.json beside a copied tokenizer.model, so that AutoTokenizer opens it
    offline as transformers' LlamaTokenizer adding no bos/eos. That tokenizes as SPMTokenizer for
    models trained as Llama's (identity normalisation, byte fallback); transformers' conversion of
    the .model does not carry other SentencePiece normalisers over."""
    config = {"tokenizer_class": "LlamaTokenizer", "model_max_length": max_positions, "add_bos_token": False,
              "add_eos_token": False, "eos_token": tok.id_to_piece(tok.eod), "unk_token": tok.id_to_piece(tok.unk)}
    if tok.pad != tok.eod:
        config["pad_token"] = tok.id_to_piece(tok.pad)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def to_hf_model(model: ModelConfig, ours: GPTModel, padded_vocab: int, ffn: int, max_positions: int,
                attn_implementation: str) -> Any:
    """A `LlamaForCausalLM` of the same architecture holding our (single-process) weights."""
    from transformers import LlamaForCausalLM

    hc = hf_config(model, padded_vocab, ffn, max_positions)
    hc._attn_implementation = attn_implementation
    hf = LlamaForCausalLM(hc)
    sd = {}
    for number, module in local_layers(ours):
        tensors = {layout.canonical_key(k): v for k, v in module.state_dict().items() if layout.canonical_key(k)}
        sd.update(to_hf_layer(number, tensors, model))
    if not model.no_weight_tying:
        sd[OUTPUT] = sd[EMBED]
    result = hf.load_state_dict(sd, strict=False)
    unmapped = [k for k in result.missing_keys if "rotary" not in k]
    if result.unexpected_keys or unmapped:
        raise ValueError(f"weights do not map: unexpected {result.unexpected_keys}, missing {unmapped}")
    return hf
