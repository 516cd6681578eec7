"""Where each weight lives in a checkpoint, and how it is cut over tensor-parallel ranks.

One model, many layouts (docs/checkpoints.md has the file tree and the rules in prose):
- Layer numbers are the layer list's (megatron/model/gpt.py): 0 embedding, 2..L+1 transformer
  layers, L+3 final norm, L+4 output layer; 1 and L+2 are weightless and have no file. With tied
  embeddings the output layer has no file either: it is layer 0's matrix.
- Names inside a layer are this framework's module names, which are GPT-NeoX's (RMSNorm: `scale`,
  `offset`; LayerNorm: `weight`, `bias`). GPT-NeoX's other spelling is mapped on reading
  (`canonical_key`): current GPT-NeoX calls the MLP linears linear1/linear2; rotary `inv_freq`
  buffers are derived, not weights.
- Tensor parallelism: column-parallel weights and biases are split on dim 0, row-parallel
  weights on dim 1, everything else is replicated. Two column-parallel tensors are fused from
  blocks that are split one by one (`fused_blocks`, megatron.parallel.layers.shard): a gated
  MLP's dense_h_to_4h ([values; gates], each rank [value_r; gate_r]) and grouped-query
  query_key_value ([q; k; v], each rank [q_r; k_r; v_r]). A whole tensor is the one-process
  one. Row-parallel biases depend on who wrote the file: this framework adds one replicated
  bias after the reduce ("replicated"); GPT-NeoX with the parallel residual adds each rank's
  bias before its single reduce, so the true bias is the sum of the shards ("sum"). With the
  sequential residual GPT-NeoX replicates them too.
- Vocabulary rows beyond the tokenizer's size are padding: dropped when known, added as zeros.
"""

from __future__ import annotations

import torch

from megatron.checkpointing.errors import CheckpointError
from megatron.config.schema import GATED_ACTIVATIONS, ModelConfig
from megatron.parallel.layers import Blocks, shard, unshard

COLUMN = {"attention.query_key_value.weight", "attention.query_key_value.bias", "mlp.dense_h_to_4h.weight",
          "mlp.dense_h_to_4h.bias", "word_embeddings.weight", "final_linear.weight"}
ROW_WEIGHT = {"attention.dense.weight", "mlp.dense_4h_to_h.weight"}
ROW_BIAS = {"attention.dense.bias", "mlp.dense_4h_to_h.bias"}
VOCAB = {"word_embeddings.weight", "final_linear.weight"}
RENAMES = {"mlp.linear1.": "mlp.dense_h_to_4h.", "mlp.linear2.": "mlp.dense_4h_to_h."}
REPLICATED, SUMMED = "replicated", "sum"


def transformer_number(index: int) -> int:
    return 2 + index


def final_norm_number(num_layers: int) -> int:
    return num_layers + 3


def output_number(num_layers: int) -> int:
    return num_layers + 4


def layer_numbers(num_layers: int, tied: bool) -> list[int]:
    """The layers that hold weights, in order."""
    numbers = [0, *range(2, num_layers + 2), final_norm_number(num_layers)]
    return numbers if tied else [*numbers, output_number(num_layers)]


def layer_file(number: int, tp_rank: int) -> str:
    return f"layer_{number:02d}-model_{tp_rank:02d}-model_states.pt"


def engine_file(mp_rank: int) -> str:
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def canonical_key(key: str) -> str | None:
    """This framework's name for a key of a layer's state dict; None for derived buffers."""
    if key.endswith("inv_freq"):
        return None
    for old, new in RENAMES.items():
        key = key.replace(old, new)
    return key


def fused_blocks(key: str, model: ModelConfig) -> Blocks:
    """The blocks of a fused column-parallel tensor of `model` (None: split as one block)."""
    if key.startswith("mlp.dense_h_to_4h.") and model.activation in GATED_ACTIVATIONS:
        return (1, 1)  # [values; gates], two equal halves
    heads = model.num_attention_heads
    kv_heads = model.num_kv_heads or heads
    if key.startswith("attention.query_key_value.") and kv_heads != heads:
        return (heads, kv_heads, kv_heads)  # [q; k; v] in units of heads
    return None


def _scaled(blocks: Blocks, rows: int) -> Blocks:
    """`fused_blocks`' proportions as row counts of a tensor with `rows` rows."""
    if blocks is None:
        return None
    unit, rest = divmod(rows, sum(blocks))
    if rest:
        raise CheckpointError(f"{rows} rows do not split into blocks in the proportions {blocks}")
    return tuple(b * unit for b in blocks)


def merge(key: str, shards: list[torch.Tensor], row_bias: str, model: ModelConfig) -> torch.Tensor:
    """The whole tensor from its tensor-parallel shards (rank order)."""
    if len(shards) == 1:
        return shards[0]
    if key in COLUMN:
        blocks = _scaled(fused_blocks(key, model), shards[0].shape[0] * len(shards))
        return unshard(shards, 0, blocks)
    if key in ROW_WEIGHT:
        return torch.cat(shards, dim=1)
    if key in ROW_BIAS and row_bias == SUMMED:
        return torch.stack(shards).sum(dim=0, dtype=torch.float64).to(shards[0].dtype)
    return shards[0]


def split(key: str, full: torch.Tensor, tp: int, model: ModelConfig, row_bias: str = REPLICATED) -> list[torch.Tensor]:
    """The tensor-parallel shards of a whole tensor. With row_bias "sum" (GPT-NeoX's parallel
    residual) rank 0 holds the whole row-parallel bias and the others zeros, so they sum back."""
    if tp == 1:
        return [full]
    if key in COLUMN or key in ROW_WEIGHT:
        dim = 0 if key in COLUMN else 1
        blocks = _scaled(fused_blocks(key, model), full.shape[0]) if dim == 0 else None
        try:
            return shard(full, dim, tp, blocks)
        except ValueError as err:
            raise CheckpointError(f"{key}: {err}") from None
    if key in ROW_BIAS and row_bias == SUMMED:
        return [full, *(torch.zeros_like(full) for _ in range(tp - 1))]
    return [full] * tp


def resize_vocab(key: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Vocabulary matrices cut or zero-padded to `rows` (padding rows are never used)."""
    if key not in VOCAB or tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows]
    pad = torch.zeros(rows - tensor.shape[0], *tensor.shape[1:], dtype=tensor.dtype)
    return torch.cat([tensor, pad])
