"""One GPT-NeoX transformer layer: attention with fused per-head QKV and partial rotary, an MLP,
and either the parallel residual (GPT-J / NeoX-20B) or the sequential one.

Shapes: activations are batch-first, [batch, seq, hidden]. Parameter names match GPT-NeoX's
checkpoint files (FACTS.md section 4), so a layer's state_dict is a layer file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from megatron.config.schema import ModelConfig
from megatron.model.init import init_std, normal_
from megatron.model.rotary import RotaryEmbedding, apply_rotary


def make_linear(
    n_in: int, n_out: int, std: float, gen: torch.Generator, device: torch.device | str | None, bias: bool = True
) -> nn.Linear:
    """A linear layer initialised from `gen` (no default init: it would be thrown away)."""
    layer = skip_init(nn.Linear, n_in, n_out, bias=bias, device=device or "cpu")
    normal_(layer.weight, std, gen)
    if bias and layer.bias.device.type != "meta":
        nn.init.zeros_(layer.bias)
    return layer


def make_norm(model: ModelConfig, device: torch.device | str | None) -> nn.Module:
    if model.norm == "rmsnorm":
        return nn.RMSNorm(model.hidden_size, eps=model.rms_norm_epsilon, device=device)
    return nn.LayerNorm(model.hidden_size, eps=model.layernorm_epsilon, device=device)


class Attention(nn.Module):
    def __init__(self, model: ModelConfig, gen: torch.Generator, device: torch.device | str | None) -> None:
        super().__init__()
        h = model.hidden_size
        self.heads = model.num_attention_heads
        self.head_dim = h // self.heads
        self.dropout = model.attention_dropout
        self.query_key_value = make_linear(h, 3 * h, init_std(model.init_method, model), gen, device)
        self.dense = make_linear(h, h, init_std(model.output_layer_init_method, model), gen, device)
        self.rotary_emb = None
        if model.pos_emb == "rotary":
            rot_dims = int(self.head_dim * model.rotary_pct)
            self.rotary_emb = RotaryEmbedding(rot_dims, model.rotary_emb_base, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # Rows of query_key_value are grouped per head as [q_h; k_h; v_h] (GPT-NeoX layout), so
        # splitting the last dim of the per-head view gives q, k, v; TP splits keep whole heads.
        qkv = self.query_key_value(x).view(b, s, self.heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each [b, heads, s, hd]
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb.cos_sin(s, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, model: ModelConfig, ffn: int, gen: torch.Generator, device: torch.device | str | None) -> None:
        super().__init__()
        h = model.hidden_size
        self.dense_h_to_4h = make_linear(h, ffn, init_std(model.init_method, model), gen, device)
        self.dense_4h_to_h = make_linear(ffn, h, init_std(model.output_layer_init_method, model), gen, device)
        if model.activation == "relu":
            self.act = nn.ReLU()
        else:  # GPT-NeoX's fused bias-GELU kernel is the tanh approximation
            self.act = nn.GELU(approximate="tanh" if model.bias_gelu_fusion else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class TransformerLayer(nn.Module):
    def __init__(
        self, model: ModelConfig, ffn: int, gen: torch.Generator, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.parallel_residual = model.gpt_j_residual
        self.hidden_dropout = model.hidden_dropout
        self.input_layernorm = make_norm(model, device)
        # Untied even with the parallel residual: GPT-NeoX-20B kept two norms by accident.
        self.post_attention_layernorm = make_norm(model, device)
        self.attention = Attention(model, gen, device)
        self.mlp = MLP(model, ffn, gen, device)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.hidden_dropout, self.training) if self.hidden_dropout else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel_residual:
            attn = self._drop(self.attention(self.input_layernorm(x)))
            mlp = self._drop(self.mlp(self.post_attention_layernorm(x)))
            return x + attn + mlp
        x = x + self._drop(self.attention(self.input_layernorm(x)))
        return x + self._drop(self.mlp(self.post_attention_layernorm(x)))
