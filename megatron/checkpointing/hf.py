"""Hugging Face `GPTNeoXForCausalLM` names for our model's weights (FACTS.md section 5).

The fused QKV rows are grouped per head in both, so weights map one to one; only the names
differ. Rotary `inv_freq` buffers are recomputed on both sides and are not mapped.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.config.schema import ModelConfig
from megatron.model.gpt import GPTModel


def hf_config(model: ModelConfig, padded_vocab: int, ffn: int, max_positions: int) -> Any:
    """The transformers config of the same architecture (needs `transformers`)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=padded_vocab, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, intermediate_size=ffn,
        max_position_embeddings=max_positions, rotary_pct=model.rotary_pct, rotary_emb_base=model.rotary_emb_base,
        use_parallel_residual=model.gpt_j_residual, hidden_act="gelu_fast" if model.bias_gelu_fusion else "gelu",
        tie_word_embeddings=not model.no_weight_tying, layer_norm_eps=model.layernorm_epsilon,
    )


def to_hf_state_dict(model: GPTModel, num_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """Our (single-process) model's weights under transformers' in-memory names."""
    layers = model.layers
    sd = {"gpt_neox.embed_in.weight": layers[0].word_embeddings.weight}
    for i in range(num_layers):
        for key, value in layers[1 + i].state_dict().items():
            if not key.endswith("inv_freq"):
                sd[f"gpt_neox.layers.{i}.{key}"] = value
    norm = layers[1 + num_layers].norm
    sd["gpt_neox.final_layer_norm.weight"], sd["gpt_neox.final_layer_norm.bias"] = norm.weight, norm.bias
    sd["lm_head.weight"] = layers[0].word_embeddings.weight if tied else layers[-1].final_linear.weight
    return sd


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
