"""Bodies of the tensor-parallel layer tests; each runs on every rank of a gloo group (see
tests/parallel/test_tp_layers.py). They compare against the dense twin built on the same rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.config.schema import ModelConfig
from megatron.model.gpt import GPTModel, layer_defs
from megatron.model.loss import lm_loss
from megatron.model.init import layer_generator
from megatron.parallel.groups import SINGLE, ParallelGroups
from megatron.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      vocab_parallel_cross_entropy)
from megatron.parallel.random import seed_tp_rng, tp_rng

TOL = dict(rtol=1e-5, atol=1e-6)


def _gather(t: torch.Tensor, dim: int, tp) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(tp.size)]
    dist.all_gather(parts, t.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def linear_layers(rank: int, world: int) -> None:
    tp = ParallelGroups(1, world, 1).tensor
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    # Column: output split; gathered it equals the dense layer, and input grads are summed.
    col, dense = (ColumnParallelLinear(8, 12, 0.5, layer_generator(1, 0), tp=t) for t in (tp, SINGLE))
    with torch.no_grad():
        col.bias.copy_(torch.arange(12.0).chunk(world)[rank]), dense.bias.copy_(torch.arange(12.0))
    y = col(x)
    torch.testing.assert_close(_gather(y, -1, tp), dense(x), **TOL)
    gx_par, = torch.autograd.grad(y.square().sum(), x)  # each rank's part; copy_to_tp sums them
    gx_dense, = torch.autograd.grad(dense(x).square().sum(), x)
    torch.testing.assert_close(gx_par, gx_dense, **TOL)
    # Row: input split; the reduced output equals the dense layer; weight grads are the slices.
    row, dense_row = (RowParallelLinear(12, 8, 0.5, layer_generator(2, 0), tp=t) for t in (tp, SINGLE))
    x2 = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    out = row(x2.chunk(world, dim=-1)[rank])
    torch.testing.assert_close(out, dense_row(x2), **TOL)
    out.square().sum().backward()
    dense_row(x2).square().sum().backward()
    torch.testing.assert_close(_gather(row.weight.grad, 1, tp), dense_row.weight.grad, **TOL)
    torch.testing.assert_close(row.bias.grad, dense_row.bias.grad, **TOL)


def embedding_and_cross_entropy(rank: int, world: int) -> None:
    tp = ParallelGroups(1, world, 1).tensor
    tokens = torch.randint(0, 16, (3, 7), generator=torch.Generator().manual_seed(2))
    emb, dense = (VocabParallelEmbedding(16, 4, 1.0, layer_generator(3, 0), tp=t) for t in (tp, SINGLE))
    out = emb(tokens)
    torch.testing.assert_close(out, dense(tokens), **TOL)
    out.sum().backward()
    dense(tokens).sum().backward()
    torch.testing.assert_close(_gather(emb.weight.grad, 0, tp), dense.weight.grad, **TOL)
    logits = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    local = logits.detach().chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, tokens, tp)
    ref = vocab_parallel_cross_entropy(logits, tokens, SINGLE)
    torch.testing.assert_close(loss, ref, **TOL)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(_gather(local.grad, -1, tp), logits.grad, **TOL)


def whole_model_gradients(rank: int, world: int, parallel_residual: bool, sequence_parallel: bool) -> None:
    """Forward loss and every parameter's gradient of the TP model equal the dense model's."""
    m = ModelConfig(pos_emb="rotary",
                    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, rotary_pct=0.5,
                    gpt_j_residual=parallel_residual, no_weight_tying=False)
    _tp_model_matches_dense(world, m, 128, None, sequence_parallel)


def _tp_model_matches_dense(world: int, m: ModelConfig, ffn: int, vocab_size: int | None,
                            sequence_parallel: bool) -> None:
    """The TP model's loss equals one process's, and every gradient, its shards merged as
    checkpoints merge them (block by block for fused gated / grouped-query tensors), too."""
    from megatron.checkpointing import layout

    groups = ParallelGroups(1, world, 1, sequence_parallel)
    models = [GPTModel(layer_defs(m, 64, ffn, 16, seed=5, tp=t, vocab_size=vocab_size))
              for t in (groups.tensor, SINGLE)]
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    labels = tokens.roll(-1, dims=1)
    losses = [lm_loss(model(tokens), labels, t) for model, t in zip(models, (groups.tensor, SINGLE))]
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    for loss in losses:
        loss.backward()
    dense = dict(models[1].named_parameters())
    for name, p in models[0].named_parameters():
        g = p.grad
        if getattr(p, "tp_sharded", False):
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous(), group=groups.tensor.group)
            key = name.split(".", 2)[2]  # "layers.3.mlp.dense_h_to_4h.weight" -> the layer's own key
            g = layout.merge(key, parts, layout.REPLICATED, m)
        torch.testing.assert_close(g, dense[name].grad, **TOL, msg=lambda s: f"{name}: {s}")


def collectives_per_layer(rank: int, world: int, parallel_residual: bool, counts: dict) -> None:
    """Counts all-reduces in one layer's forward; the result is checked by the caller via `counts`."""
    from megatron.model.transformer import TransformerLayer

    tp = ParallelGroups(1, world, 1).tensor
    m = ModelConfig(pos_emb="rotary", num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=8,
                    gpt_j_residual=parallel_residual)
    layer = TransformerLayer(m, 128, layer_generator(0, 2), tp=tp)
    calls = {"all_reduce": 0, "all_gather": 0}
    real = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def wrapper(*a, **kw):
            calls[name] += 1
            return real[name](*a, **kw)
        return wrapper

    for name in calls:
        setattr(dist, name, counting(name))
    try:
        layer(torch.randn(2, 8, 32))
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    expected = 1 if parallel_residual else 2
    assert calls == {"all_reduce": expected, "all_gather": 0}, calls


def dropout_streams(rank: int, world: int) -> None:
    """Masks drawn on the tensor-parallel stream differ across ranks; default-stream masks match."""
    tp = ParallelGroups(1, world, 1).tensor
    torch.manual_seed(7)
    seed_tp_rng(7, rank)
    replicated = torch.nn.functional.dropout(torch.ones(64), 0.5)
    with tp_rng():
        split = torch.nn.functional.dropout(torch.ones(64), 0.5)
    after = torch.nn.functional.dropout(torch.ones(64), 0.5)  # the default stream was not advanced by tp_rng
    both = [_gather(t.unsqueeze(0), 0, tp) for t in (replicated, split, after)]
    assert torch.equal(both[0][0], both[0][1]) and torch.equal(both[2][0], both[2][1])
    assert not torch.equal(both[1][0], both[1][1])
    torch.manual_seed(7)
    torch.nn.functional.dropout(torch.ones(64), 0.5)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), after)


def llama_config(kv_heads: int | None, **kw) -> ModelConfig:
    """A small Llama-shaped model: RMSNorm, SwiGLU, no biases, untied, full rotary."""
    base = dict(pos_emb="rotary",
                num_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=kv_heads, seq_length=16,
                norm="rmsnorm", rms_norm_epsilon=1e-6, activation="swiglu", use_bias_in_norms=False,
                use_bias_in_attn_linear=False, use_bias_in_mlp=False, rotary_pct=1.0, no_weight_tying=True)
    return ModelConfig(**{**base, **kw})


def llama_gradients(rank: int, world: int, kv_heads: int | None, sequence_parallel: bool) -> None:
    """A Llama-shaped TP model (gated MLP, grouped-query attention when kv_heads < heads) gives one
    process's loss and every gradient."""
    _tp_model_matches_dense(world, llama_config(kv_heads), 96, 64, sequence_parallel)