"""One GPT-NeoX transformer layer: attention with fused QKV (multi-head or grouped-query) and
partial or full rotary, an MLP (plain or gated), and either the parallel residual (GPT-J /
NeoX-20B) or the sequential one. Llama is this same layer with other parts: RMSNorm, SwiGLU, no
biases, grouped-query attention (Llama-2-70B), full rotary, sequential residual.

Shapes: activations are batch-first, [batch, seq, hidden] ([batch, seq / tp, hidden] between
layers with sequence parallelism). Parameter names match GPT-NeoX's checkpoint files
(docs/checkpoints.md), so a layer's state_dict is a layer file. The linears are tensor-parallel ones; with
one rank they are plain linears.

Dropout with the parallel residual is applied once, to attn + mlp after their single reduce
(x + drop(attn + mlp)), so every tensor-parallel layout draws the same mask as one process.

Generation (megatron/generation) passes a `DecodeStep` (each token's position and an explicit
attention mask, for batches of left-padded prompts) and optionally a per-layer `KVCache`. Without
them a layer runs the training path, unchanged: causal attention over positions 0..s-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config.schema import ModelConfig
from megatron.model.init import init_std
from megatron.model.layer_types import activation
from megatron.model.rotary import RotaryEmbedding, apply_rotary
from megatron.parallel.comm import leave_tp
from megatron.parallel.groups import SINGLE, TensorParallel
from megatron.parallel.layers import ColumnParallelLinear, LayerNorm, RMSNorm, RowParallelLinear
from megatron.parallel.random import tp_rng

Device = torch.device | str


def make_norm(model: ModelConfig, device: Device, tp: TensorParallel = SINGLE) -> nn.Module:
    """LayerNorm (weight, bias) or RMSNorm (GPT-NeoX's scale, offset); the bias/offset only with
    use_bias_in_norms, as in GPT-NeoX."""
    if model.norm == "rmsnorm":
        return RMSNorm(model.hidden_size, model.rms_norm_epsilon, device, tp, bias=model.use_bias_in_norms)
    return LayerNorm(model.hidden_size, model.layernorm_epsilon, device, tp, bias=model.use_bias_in_norms)


@dataclass(frozen=True)
class DecodeStep:
    """Where the s tokens of one generation forward sit in their sequences.

    positions: [b, s] each token's position in its own sequence (rotary angles).
    mask: [b, 1, s, keys] bool, True where a query may attend; keys = cached tokens + s."""

    positions: torch.Tensor
    mask: torch.Tensor


class KVCache:
    """Keys and values of one attention layer while generating: [b, key/value heads on this rank,
    capacity, head_dim], preallocated so that a decoding step writes one column instead of copying all."""

    def __init__(self, batch: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: Device) -> None:
        self.keys = torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.filled = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this forward's keys and values ([b, heads, s, hd]); returns all cached so far."""
        end = self.filled + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KVCache holds {self.keys.shape[2]} positions; {end} requested")
        self.keys[:, :, self.filled:end] = k
        self.values[:, :, self.filled:end] = v
        self.filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def rotary_at(rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [b, 1, s, rot_dims] at arbitrary positions [b, s]: the same fp32 angles as the
    rows of `RotaryEmbedding.cos_sin`'s table, for tokens that do not sit at 0..s-1."""
    freqs = positions.float().unsqueeze(-1) * rotary.inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    """Heads are split over tensor-parallel ranks: query_key_value is column-parallel (whole heads
    per rank), dense is row-parallel.

    query_key_value's rows, GPT-NeoX's two layouts:
    - multi-head (num_kv_heads unset or = heads): grouped per head, [q_h; k_h; v_h], so a rank's
      contiguous slice is whole heads;
    - grouped-query (num_kv_heads < heads): [all q; all k; all v] in one process; each rank holds
      its slice of each block ([q_r; k_r; v_r], see megatron.parallel.layers.shard): heads/tp
      query heads and num_kv_heads/tp key/value heads. Query head i uses key/value head
      i // (heads / num_kv_heads), as in GPT-NeoX and Llama."""

    def __init__(self, model: ModelConfig, gen: torch.Generator, device: Device, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        h, heads = model.hidden_size, model.num_attention_heads
        kv_heads = model.num_kv_heads or heads
        if heads % kv_heads or kv_heads % tp.size:
            raise ValueError(f"num_kv_heads {kv_heads} must divide num_attention_heads {heads} and be divisible "
                             f"by model_parallel_size {tp.size}")
        self.heads, self.kv_heads = heads // tp.size, kv_heads // tp.size  # on this rank
        self.head_dim = h // heads
        self.grouped = kv_heads != heads
        kv = kv_heads * self.head_dim
        self.dropout = model.attention_dropout
        bias = model.use_bias_in_attn_linear
        self.query_key_value = ColumnParallelLinear(h, h + 2 * kv, init_std(model.init_method, model), gen, device,
                                                    bias=bias, tp=tp, blocks=(h, kv, kv) if self.grouped else None)
        self.dense = RowParallelLinear(h, h, init_std(model.output_layer_init_method, model), gen, device, bias=bias,
                                       tp=tp)
        self.rotary_emb = None
        if model.pos_emb == "rotary":
            rot_dims = int(self.head_dim * model.rotary_pct)
            self.rotary_emb = RotaryEmbedding(rot_dims, model.rotary_emb_base, device=device)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, heads, s, hd] and k, v [b, kv_heads, s, hd] from this rank's fused projection."""
        b, s = qkv.shape[:2]
        if not self.grouped:
            qkv = qkv.view(b, s, self.heads, 3 * self.head_dim)
            return qkv.transpose(1, 2).split(self.head_dim, dim=-1)
        hd = self.head_dim
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        return (q.view(b, s, -1, hd).transpose(1, 2), k.view(b, s, -1, hd).transpose(1, 2),
                v.view(b, s, -1, hd).transpose(1, 2))

    def forward(self, x: torch.Tensor, reduce: bool = True, step: DecodeStep | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """reduce=False returns this rank's partial output without bias (see TransformerLayer).
        step (generation): positions and mask of x's tokens; cache: keys/values of earlier ones."""
        qkv = self.query_key_value(x)  # [b, s, (heads + 2 kv_heads) * hd / tp], the full sequence even with SP
        b, s = qkv.shape[:2]
        q, k, v = self._split_heads(qkv)
        if step is not None:
            out = self._attend_decoding(q, k, v, step, cache)
        else:
            if self.rotary_emb is not None:
                cos, sin = self.rotary_emb.cos_sin(s, q.dtype)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            with tp_rng():  # heads differ per rank, so must their dropout masks
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
                    scale=1.0 / math.sqrt(self.head_dim), enable_gqa=self.grouped,
                )
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.dense(out) if reduce else self.dense.partial(out)

    def _attend_decoding(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: DecodeStep,
                         cache: KVCache | None) -> torch.Tensor:
        """Attention at the step's positions under its mask, over the cached keys and these."""
        if self.rotary_emb is not None:
            cos, sin = rotary_at(self.rotary_emb, step.positions, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, scale=1.0 / math.sqrt(self.head_dim),
                                              enable_gqa=self.grouped)


class MLP(nn.Module):
    """dense_h_to_4h -> activation -> dense_4h_to_h; `ffn` is the activation's output width.

    Gated activations (swiglu, geglu, ...): dense_h_to_4h outputs 2 x ffn, per tensor-parallel
    rank [value_r; gate_r] (GPT-NeoX's linear1 chunked in two), and the activation is
    f(gate) * value. In one process that is [all values; all gates]."""

    def __init__(self, model: ModelConfig, ffn: int, gen: torch.Generator, device: Device, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        h, bias = model.hidden_size, model.use_bias_in_mlp
        self.act, self.gated = activation(model.activation, model.bias_gelu_fusion)
        n_out, blocks = (2 * ffn, (ffn, ffn)) if self.gated else (ffn, None)
        self.dense_h_to_4h = ColumnParallelLinear(h, n_out, init_std(model.init_method, model), gen, device, bias=bias,
                                                  tp=tp, blocks=blocks)
        self.dense_4h_to_h = RowParallelLinear(ffn, h, init_std(model.output_layer_init_method, model), gen, device,
                                               bias=bias, tp=tp)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        y = self.dense_h_to_4h(x)
        if self.gated:
            value, gate = y.chunk(2, dim=-1)
            y = self.act(gate) * value
        else:
            y = self.act(y)
        return self.dense_4h_to_h(y) if reduce else self.dense_4h_to_h.partial(y)


class TransformerLayer(nn.Module):
    def __init__(
        self, model: ModelConfig, ffn: int, gen: torch.Generator, device: Device = "cpu", tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        self.tp = tp
        self.parallel_residual = model.gpt_j_residual
        self.hidden_dropout = model.hidden_dropout
        self.input_layernorm = make_norm(model, device, tp)
        # Untied even with the parallel residual: GPT-NeoX-20B kept two norms by accident.
        self.post_attention_layernorm = make_norm(model, device, tp)
        self.attention = Attention(model, gen, device, tp)
        self.mlp = MLP(model, ffn, gen, device, tp)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.hidden_dropout and self.training):
            return x
        if self.tp.sequence_parallel:  # sequence shards differ per rank
            with tp_rng():
                return F.dropout(x, self.hidden_dropout)
        return F.dropout(x, self.hidden_dropout)  # replicated: same mask on every rank

    def forward(self, x: torch.Tensor, step: DecodeStep | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """step / cache: generation only (see Attention.forward); training passes neither."""
        if self.parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)): the two row-parallel partial outputs are summed
            # locally and reduced ONCE; the replicated biases are added after the reduce.
            # (GPT-NeoX adds per-rank biases before it, which is why its shards' biases sum.)
            attn = self.attention(self.input_layernorm(x), reduce=False, step=step, cache=cache)
            mlp = self.mlp(self.post_attention_layernorm(x), reduce=False)
            out = leave_tp(attn + mlp, self.tp)
            out = self.mlp.dense_4h_to_h.add_bias(self.attention.dense.add_bias(out))
            return x + self._drop(out)
        x = x + self._drop(self.attention(self.input_layernorm(x), step=step, cache=cache))
        return x + self._drop(self.mlp(self.post_attention_layernorm(x)))
