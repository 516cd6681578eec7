"""Where each weight lives in a checkpoint, and how it is cut over tensor-parallel ranks.

One model, many layouts (docs/checkpoints.md has the file tree and the rules in prose):
- Layer numbers are the layer list's (megatron/model/gpt.py): 0 embedding, 2..L+1 transformer
  layers, L+3 final norm, L+4 output layer; 1 and L+2 are weightless and have no file. With tied
  embeddings the output layer has no file either: it is layer 0's matrix.
- Names inside a layer are this framework's module names. GPT-NeoX's other spellings are
  mapped on reading (`canonical_key`): current GPT-NeoX calls the MLP linears linear1/linear2
  and RMSNorm's parameter `scale`; rotary `inv_freq` buffers are derived, not weights.
- Tensor parallelism: column-parallel weights and biases are split on dim 0, row-parallel
  weights on dim 1, everything else is replicated. Row-parallel biases depend on who wrote the
  file: this framework adds one replicated bias after the reduce ("replicated"); GPT-NeoX with
  the parallel residual adds each rank's bias before its single reduce, so the true bias is the
  sum of the shards ("sum"). With the sequential residual GPT-NeoX replicates them too.
- Vocabulary rows beyond the tokenizer's size are padding: dropped when known, added as zeros.
"""

from __future__ import annotations

import torch

from megatron.checkpointing.errors import CheckpointError

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
    if key.endswith("norm.scale"):
        key = key[: -len("scale")] + "weight"
    return key


def merge(key: str, shards: list[torch.Tensor], row_bias: str) -> torch.Tensor:
    """The whole tensor from its tensor-parallel shards (rank order)."""
    if len(shards) == 1:
        return shards[0]
    if key in COLUMN:
        return torch.cat(shards, dim=0)
    if key in ROW_WEIGHT:
        return torch.cat(shards, dim=1)
    if key in ROW_BIAS and row_bias == SUMMED:
        return torch.stack(shards).sum(dim=0, dtype=torch.float64).to(shards[0].dtype)
    return shards[0]


def split(key: str, full: torch.Tensor, tp: int, row_bias: str = REPLICATED) -> list[torch.Tensor]:
    """The tensor-parallel shards of a whole tensor. With row_bias "sum" (GPT-NeoX's parallel
    residual) rank 0 holds the whole row-parallel bias and the others zeros, so they sum back."""
    if tp == 1:
        return [full]
    if key in COLUMN or key in ROW_WEIGHT:
        dim = 0 if key in COLUMN else 1
        if full.shape[dim] % tp:
            raise CheckpointError(f"{key}: dimension {dim} of shape {list(full.shape)} does not split into {tp} ranks")
        return [t.contiguous() for t in full.chunk(tp, dim=dim)]
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
