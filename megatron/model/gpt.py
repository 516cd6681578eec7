"""GPT-NeoX as a list of layers, read top to bottom:

    0        Embedding            tokens [b, s] -> hidden [b, s, h]
    1        (weightless step)
    2..L+1   TransformerLayer x L
    L+2      (weightless step)
    L+3      FinalNorm
    L+4      OutputLayer          hidden -> logits [b, s, padded_vocab]

The embedding and output matrices have `padded_vocab` rows (the tokenizer's `vocab_size` rounded
up for tensor parallelism). When `layer_defs` is given the real `vocab_size`, the padding rows
start at zero and their logits are -inf, so they take no part in the softmax, the loss or
sampling: every padding (hence every tensor-parallel size) computes the same model.

The numbering is GPT-NeoX's pipeline layer list, so DeepSpeed writes the same
`layer_XX-model_YY-model_states.pt` files (docs/checkpoints.md). The same list is run plainly by
`GPTModel` or handed to DeepSpeed's pipeline engine by `megatron.parallel.pipeline`; there is one
copy of the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init
from torch.utils.checkpoint import checkpoint

from megatron.config.schema import ModelConfig
from megatron.model.init import init_std, layer_generator
from megatron.model.layer_types import expand_attention_config
from megatron.model.transformer import Device, TransformerLayer, make_norm
from megatron.parallel.comm import enter_tp, scatter_to_sequence
from megatron.parallel.groups import SINGLE, TensorParallel
from megatron.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, normal_
from megatron.parallel.random import checkpoint_context, tp_rng


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None, start: int) -> torch.Tensor:
    """Set, in place, the logits of vocabulary ids >= vocab_size to -inf; this rank's columns are
    the global ids [start, start + logits.shape[-1]). None: no padding to exclude.

    Why: padding rows exist only to make tensor-parallel shards equal; if they took part in the
    softmax, the model (and its loss) would depend on the padding, i.e. on the TP size. -inf gives
    them probability 0 and, through the fill, gradient 0. Only the padded columns are written;
    autograd allows it (the linear's backward saves its inputs, not its output)."""
    if vocab_size is None:
        return logits
    first = max(vocab_size - start, 0)  # local index of the first padded column
    if first < logits.shape[-1]:
        logits[..., first:] = float("-inf")
    return logits


class Embedding(nn.Module):
    """Token (+ learned position) embedding. The vocabulary is split over tensor-parallel ranks;
    with sequence parallelism the output leaves as this rank's slice of the sequence.

    `vocab_size` (the real vocabulary, None: no padding) is kept for `tied_output`; only its rows
    are drawn at init, the padding rows start at zero."""

    def __init__(
        self, model: ModelConfig, padded_vocab: int, max_positions: int, gen: torch.Generator,
        device: Device = "cpu", tp: TensorParallel = SINGLE, vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        std = init_std(model.init_method, model)
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, model.hidden_size, std, gen, device, tp,
                                                      init_rows=vocab_size)
        self.position_embeddings = None
        if model.pos_emb == "learned":
            self.position_embeddings = skip_init(nn.Embedding, max_positions, model.hidden_size, device=device)
            normal_(self.position_embeddings.weight, std, gen)
        self.dropout = model.hidden_dropout

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(tokens.shape[1], device=tokens.device))
        if self.tp.sequence_parallel:
            x = scatter_to_sequence(x, self.tp)
            if self.dropout and self.training:
                with tp_rng():
                    x = F.dropout(x, self.dropout)
            return x
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class FinalNorm(nn.Module):
    def __init__(self, model: ModelConfig, gen: torch.Generator, device: Device = "cpu", tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.norm = make_norm(model, device, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class OutputLayer(nn.Module):
    """hidden -> logits, split over the vocabulary on tensor-parallel ranks (never gathered).
    Logits of ids >= vocab_size (the padding) are -inf; only the real rows are drawn at init."""

    def __init__(
        self, model: ModelConfig, padded_vocab: int, gen: torch.Generator, device: Device = "cpu",
        tp: TensorParallel = SINGLE, vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        std = init_std(model.init_method, model)
        self.final_linear = ColumnParallelLinear(model.hidden_size, padded_vocab, std, gen, device, bias=False, tp=tp,
                                                 init_rows=vocab_size)
        self.vocab_size = vocab_size
        self.start = tp.rank * (padded_vocab // tp.size)  # global id of this rank's first column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mask_padded_vocab(self.final_linear(x), self.vocab_size, self.start)


def tied_output(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    """The output layer when weights are tied: logits from the input embedding matrix, padded
    ids -inf as in `OutputLayer`."""
    logits = F.linear(enter_tp(x, embedding.tp), embedding.word_embeddings.weight)
    return mask_padded_vocab(logits, embedding.vocab_size, embedding.word_embeddings.start)


def gpt_neox_layer_slot(x: torch.Tensor) -> torch.Tensor:
    """A weightless step kept so layer numbers (and checkpoint file names) match GPT-NeoX, which
    transposes [b, s, h] <-> [s, b, h] here; our activations stay batch-first."""
    return x


@dataclass
class LayerDef:
    """One entry of the layer list: a class and its arguments, or a weightless function."""

    name: str
    build: type | Callable | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    tied_key: str | None = None
    forward_fn: Callable | None = None

    def instantiate(self) -> nn.Module:
        return self.build(**self.kwargs)


def layer_defs(
    model: ModelConfig, padded_vocab: int, ffn: int, max_positions: int, seed: int,
    device: Device = "cpu", tp: TensorParallel = SINGLE, vocab_size: int | None = None,
) -> list[LayerDef]:
    """The architecture as an ordered list; every weighted layer gets its own seeded generator.

    ffn: the MLP's activation output width (derived.intermediate_size; a gated MLP's
    dense_h_to_4h has twice as many rows).
    vocab_size: the tokenizer's real vocabulary (<= padded_vocab). Logits of ids >= vocab_size
    are -inf and those rows start at zero; None treats all padded_vocab rows as real."""
    if vocab_size is not None and not 1 <= vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, padded_vocab {padded_vocab}]")
    L = model.num_layers
    expand_attention_config(model.attention_config, L)  # refuses attention types this layer does not run
    tie = not model.no_weight_tying
    defs = [LayerDef(
        "embedding", Embedding,
        dict(model=model, padded_vocab=padded_vocab, max_positions=max_positions,
             gen=layer_generator(seed, 0), device=device, tp=tp, vocab_size=vocab_size),
        tied_key="embed" if tie else None,
    ), LayerDef("slot", gpt_neox_layer_slot)]
    for i in range(L):
        defs.append(LayerDef(f"layer{i}", TransformerLayer,
                             dict(model=model, ffn=ffn, gen=layer_generator(seed, 2 + i), device=device, tp=tp)))
    defs.append(LayerDef("slot", gpt_neox_layer_slot))
    defs.append(LayerDef("final_norm", FinalNorm, dict(model=model, gen=layer_generator(seed, L + 3), device=device, tp=tp)))
    if tie:
        defs.append(LayerDef("output", Embedding, defs[0].kwargs, tied_key="embed", forward_fn=tied_output))
    else:
        defs.append(LayerDef("output", OutputLayer, dict(
            model=model, padded_vocab=padded_vocab, gen=layer_generator(seed, L + 4), device=device, tp=tp,
            vocab_size=vocab_size)))
    return defs


class GPTModel(nn.Module):
    """The layer list run in one process (no pipeline): embedding -> layers -> norm -> logits."""

    def __init__(self, defs: list[LayerDef], checkpoint_num_layers: int = 0) -> None:
        super().__init__()
        self.checkpoint_num_layers = checkpoint_num_layers
        tied: dict[str, nn.Module] = {}
        modules: list[nn.Module] = []
        self.steps: list[tuple[int | None, Callable | None]] = []
        for d in defs:
            if d.build is not None and isinstance(d.build, type):
                if d.tied_key and d.tied_key in tied:
                    module = tied[d.tied_key]
                else:
                    module = d.instantiate()
                    modules.append(module)
                    if d.tied_key:
                        tied[d.tied_key] = module
                self.steps.append((modules.index(module), d.forward_fn))
            else:
                self.steps.append((None, d.build))
        self.layers = nn.ModuleList(modules)

    def _run(self, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
        for index, fn in self.steps[start:end]:
            if index is None:
                x = fn(x)
            elif fn is not None:
                x = fn(self.layers[index], x)
            else:
                x = self.layers[index](x)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.checkpoint_num_layers
        if not (n and self.training):
            return self._run(0, len(self.steps), tokens)
        x = self._run(0, 2, tokens)
        last = len(self.steps) - 3  # transformer layers are steps 2 .. last-1
        for start in range(2, last, n):
            end = min(start + n, last)
            # Non-reentrant checkpoint restores the RNG state, so dropout masks match the forward.
            x = checkpoint(self._run, start, end, x, use_reentrant=False, context_fn=checkpoint_context)
        return self._run(last, len(self.steps), x)


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in module.parameters())
