"""The model against Hugging Face's GPTNeoXForCausalLM, exact 20B parameter count, init statistics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron.checkpointing.hf import to_hf_model
from megatron.config import load_config
from megatron.config.schema import ModelConfig
from megatron.model import GPTModel, count_parameters, layer_defs
from megatron.model.sizing import meta_model

ROOT = Path(__file__).resolve().parents[2]


def tiny(**kw) -> ModelConfig:
    base = dict(pos_emb="rotary", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, rotary_pct=0.25,
                no_weight_tying=True, init_method="small_init", output_layer_init_method="wang_init")
    return ModelConfig(**{**base, **kw})


def hf_twin(m: ModelConfig, ours: GPTModel, vocab: int):
    pytest.importorskip("transformers")
    # "eager": the plain formula, not another fused kernel
    return to_hf_model(m, ours, vocab, 4 * m.hidden_size, m.seq_length, "eager").eval()


@pytest.mark.parametrize("parallel, fused_gelu, untied, rotary", [
    (True, True, True, {}), (False, False, True, {}), (True, False, False, {}),
    (True, True, True, {"rotary_emb_base": 500, "rotary_pct": 0.5}),
])
def test_logits_match_transformers(parallel, fused_gelu, untied, rotary):
    m = tiny(gpt_j_residual=parallel, bias_gelu_fusion=fused_gelu, no_weight_tying=untied, **rotary)
    ours = GPTModel(layer_defs(m, 128, 256, 32, seed=3)).eval()
    hf = hf_twin(m, ours, 128)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    assert a.shape == (2, 32, 128)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_20b_parameter_count_on_meta():
    cfg = load_config([str(ROOT / "configs/20B.yml"), str(ROOT / "configs/local_setup.yml")], require_files=False)
    model = meta_model(cfg)
    assert count_parameters(model) == 20_554_567_680
    assert all(p.device.type == "meta" for p in model.parameters())
    block = model.layers[1]
    assert block.attention.query_key_value.weight.shape == (18432, 6144)
    assert block.mlp.dense_4h_to_h.weight.shape == (6144, 24576)
    assert block.attention.rotary_emb.inv_freq.shape == (12,)  # 24 rotary dims of 96


def test_tied_embedding_counted_once():
    m = tiny(no_weight_tying=False)
    model = GPTModel(layer_defs(m, 128, 256, 32, seed=0))
    h, v, f = 64, 128, 256
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    assert count_parameters(model) == v * h + 2 * per_layer + 2 * h


def test_init_statistics():
    m = tiny(hidden_size=256, num_attention_heads=4, num_layers=4)
    model = GPTModel(layer_defs(m, 512, 1024, 32, seed=0))
    small = math.sqrt(2 / (5 * 256))
    wang = 2 / (4 * math.sqrt(256))
    block = model.layers[1]
    assert block.attention.query_key_value.weight.std().item() == pytest.approx(small, rel=0.02)
    assert block.attention.dense.weight.std().item() == pytest.approx(wang, rel=0.02)
    assert block.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(wang, rel=0.02)
    assert block.attention.query_key_value.bias.abs().max().item() == 0.0
    assert block.input_layernorm.weight.min().item() == 1.0
    # Each layer draws from its own seeded generator: rebuilding gives the same weights.
    again = GPTModel(layer_defs(m, 512, 1024, 32, seed=0))
    assert torch.equal(again.layers[3].mlp.dense_h_to_4h.weight, model.layers[3].mlp.dense_h_to_4h.weight)
    assert not torch.equal(model.layers[1].mlp.dense_h_to_4h.weight, model.layers[2].mlp.dense_h_to_4h.weight)


def test_normal_and_scaled_normal_init():
    m = tiny(hidden_size=256, num_layers=8, init_method="normal", output_layer_init_method="scaled_normal",
             init_method_std=0.02)
    block = GPTModel(layer_defs(m, 512, 1024, 32, seed=0)).layers[1]
    assert block.mlp.dense_h_to_4h.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.02)


def test_rmsnorm_is_gpt_neox_formula():
    """GPT-NeoX's RMSNorm (megatron/model/norms.py): scale * x * rsqrt(mean(x^2) + eps), in
    parameters named `scale` (and `offset` only with use_bias_in_norms)."""
    from megatron.parallel.layers import RMSNorm

    m = tiny(norm="rmsnorm", use_bias_in_norms=False)
    model = GPTModel(layer_defs(m, 128, 256, 32, seed=0))
    norms = [mod for mod in model.modules() if isinstance(mod, RMSNorm)]
    assert len(norms) == 2 * m.num_layers + 1
    assert sorted({name.rsplit(".", 1)[1] for name, _ in model.named_parameters() if "norm" in name}) == ["scale"]
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(model(tokens).view(-1, 128), tokens.view(-1))
    assert loss.item() == pytest.approx(math.log(128), rel=0.1)
    norm = norms[0].double()
    with torch.no_grad():
        norm.scale.copy_(torch.linspace(0.5, 1.5, m.hidden_size))
    x = torch.randn(2, 5, m.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    expected = norm.scale * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + m.rms_norm_epsilon)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_activation_checkpointing_same_gradients():
    m = tiny()
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for n in (0, 1):
        model = GPTModel(layer_defs(m, 128, 256, 32, seed=3), checkpoint_num_layers=n).train()
        torch.nn.functional.cross_entropy(model(tokens).view(-1, 128), tokens.view(-1)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name, layers, hidden", [("125M", 12, 768), ("350M", 24, 1024), ("1-3B", 24, 2048)])
def test_small_configs_plan_exact_sizes(name, layers, hidden):
    """Per layer 12h^2 + 13h (QKV, dense, two MLP matrices, their biases, two norms), untied
    embeddings of the padded vocabulary, a final norm: GPT-NeoX's count."""
    cfg = load_config([str(ROOT / f"configs/{name}.yml"), str(ROOT / "configs/local_setup.yml")],
                      require_files=False)
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (layers, hidden)
    vocab = cfg.derived.padded_vocab_size
    assert vocab == 50304
    expected = layers * (12 * hidden**2 + 13 * hidden) + 2 * vocab * hidden + 2 * hidden
    assert count_parameters(meta_model(cfg)) == expected


def test_dropout_acts_in_training_only():
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    plain = GPTModel(layer_defs(tiny(), 128, 256, 32, seed=3)).eval()
    dropped = GPTModel(layer_defs(tiny(hidden_dropout=0.3, attention_dropout=0.3), 128, 256, 32, seed=3))
    with torch.no_grad():
        reference = plain(tokens)
        torch.testing.assert_close(dropped.eval()(tokens), reference, rtol=0, atol=0)
        first, second = dropped.train()(tokens), dropped(tokens)
    assert (first - reference).abs().max().item() > 0.01
    assert (first - second).abs().max().item() > 0.01  # a fresh mask each call
