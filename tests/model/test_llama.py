"""Llama-family models in the one transformer layer: logits of transformers' LlamaForCausalLM
with the same weights, exact Llama-7B and Llama-2-70B parameter counts, tensor parallelism with
grouped-query attention and a gated MLP (2 gloo ranks here; TP2 x PP2 training in
tests/parallel/test_layouts.py), the activations and attention types GPT-NeoX names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tp_workers
from helpers import run_distributed
from megatron.config.config import mlp_width
from megatron.config.schema import ModelConfig
from megatron.model import GPTModel, count_parameters, layer_defs
from megatron.model.layer_types import activation, expand_attention_config

VOCAB = 96


def to_llama_state_dict(m: ModelConfig, ours: GPTModel) -> dict[str, torch.Tensor]:
    """Our one-process weights under LlamaForCausalLM's names. query_key_value is per head
    [q_h; k_h; v_h] (multi-head) or [q; k; v] (grouped-query); dense_h_to_4h is [up; gate]
    (GPT-NeoX's [value; gate]); rotary is "rotate half" in both, so no permutation."""
    L, h, heads = m.num_layers, m.hidden_size, m.num_attention_heads
    hd, kv_heads = h // heads, m.num_kv_heads or heads
    sd = {"model.embed_tokens.weight": ours.layers[0].word_embeddings.weight,
          "model.norm.weight": ours.layers[L + 1].norm.scale,
          "lm_head.weight": ours.layers[L + 2].final_linear.weight}
    for i in range(L):
        layer, pre = ours.layers[1 + i], f"model.layers.{i}."
        qkv = layer.attention.query_key_value.weight
        if kv_heads == heads:
            q, k, v = qkv.view(heads, 3, hd, h).unbind(1)
        else:
            q, k, v = qkv.split([h, kv_heads * hd, kv_heads * hd])
        up, gate = layer.mlp.dense_h_to_4h.weight.chunk(2)
        sd.update({
            pre + "self_attn.q_proj.weight": q.reshape(-1, h), pre + "self_attn.k_proj.weight": k.reshape(-1, h),
            pre + "self_attn.v_proj.weight": v.reshape(-1, h),
            pre + "self_attn.o_proj.weight": layer.attention.dense.weight,
            pre + "mlp.gate_proj.weight": gate, pre + "mlp.up_proj.weight": up,
            pre + "mlp.down_proj.weight": layer.mlp.dense_4h_to_h.weight,
            pre + "input_layernorm.weight": layer.input_layernorm.scale,
            pre + "post_attention_layernorm.weight": layer.post_attention_layernorm.scale,
        })
    return {k: v.detach().clone() for k, v in sd.items()}


def llama_twin(m: ModelConfig, ours: GPTModel, ffn: int):
    transformers = pytest.importorskip("transformers")
    hc = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=m.hidden_size, intermediate_size=ffn, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_kv_heads or m.num_attention_heads,
        max_position_embeddings=m.seq_length, rms_norm_eps=m.rms_norm_epsilon, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_emb_base)},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hc).float().eval()
    missing, unexpected = hf.load_state_dict(to_llama_state_dict(m, ours), strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("kv_heads, rope_base", [(None, 10000), (2, 10000), (4, 500000), (1, 10000)])
def test_logits_match_llama(kv_heads, rope_base):
    m = tp_workers.llama_config(kv_heads, seq_length=32, rotary_emb_base=rope_base, init_method="small_init")
    ffn = mlp_width(m)  # GPT-NeoX's rule on 4h = 256: int(256 * 2/3) // 2 = 85, rounded to 85
    ours = GPTModel(layer_defs(m, VOCAB, ffn, 32, seed=3, vocab_size=VOCAB)).eval()
    # RMSNorm scales start at 1; move them so that a swapped or misnamed norm shows.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("scale"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    hf = llama_twin(m, ours, ffn)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(tokens), hf(tokens).logits
    assert want.abs().max() > 0.1  # not a degenerate comparison
    assert (got - want).abs().max().item() < 1e-4


def test_llama_parameter_names_and_shapes():
    m = tp_workers.llama_config(2)
    model = GPTModel(layer_defs(m, VOCAB, 96, 16, seed=0, vocab_size=VOCAB))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.startswith(("layers.1.", "layers.3.",
                                                                                        "layers.4."))}
    assert shapes == {
        "layers.1.input_layernorm.scale": (64,), "layers.1.post_attention_layernorm.scale": (64,),
        "layers.1.attention.query_key_value.weight": (64 + 2 * 2 * 8, 64),  # 8 q heads, 2 kv heads of 8
        "layers.1.attention.dense.weight": (64, 64),
        "layers.1.mlp.dense_h_to_4h.weight": (2 * 96, 64), "layers.1.mlp.dense_4h_to_h.weight": (64, 96),
        "layers.3.norm.scale": (64,), "layers.4.final_linear.weight": (VOCAB, 64),
    }


def test_norm_bias_is_gpt_neox_offset():
    m = tp_workers.llama_config(None, use_bias_in_norms=True)
    model = GPTModel(layer_defs(m, VOCAB, 96, 16, seed=0))
    norm = model.layers[1].input_layernorm
    assert sorted(n for n, _ in norm.named_parameters()) == ["offset", "scale"]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        norm.scale.fill_(2.0), norm.offset.fill_(0.25)
    expected = 2.0 * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + m.rms_norm_epsilon) + 0.25
    torch.testing.assert_close(norm(x), expected)
    layernorm = GPTModel(layer_defs(tp_workers.llama_config(None, norm="layernorm"), VOCAB, 96, 16, seed=0))
    assert sorted(n for n, _ in layernorm.layers[1].input_layernorm.named_parameters()) == ["weight"]


def _llama(**kw) -> ModelConfig:
    return ModelConfig(pos_emb="rotary",
                       norm="rmsnorm", activation="swiglu", use_bias_in_norms=False, use_bias_in_attn_linear=False,
                       use_bias_in_mlp=False, no_weight_tying=True, rotary_pct=1.0, make_vocab_size_divisible_by=1,
                       seq_length=4096, **kw)


@pytest.mark.parametrize("shape, width, total", [
    # GPT-NeoX's configs/llama/7B.yml and llama2/70B.yml; Meta's published sizes.
    (dict(num_layers=32, hidden_size=4096, num_attention_heads=32, intermediate_size=32768, mlp_multiple_of=256),
     11008, 6_738_415_616),
    (dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8, intermediate_size=86016,
          mlp_multiple_of=4096), 28672, 68_976_648_192),
])
def test_llama_parameter_counts_on_meta(shape, width, total):
    m = _llama(**shape)
    assert mlp_width(m) == width
    model = GPTModel(layer_defs(m, 32000, width, 4096, seed=0, device="meta", vocab_size=32000))
    assert count_parameters(model) == total


@pytest.mark.parametrize("kv_heads, sequence_parallel", [(2, False), (None, False), (2, True)])
def test_tensor_parallel_llama_loss_and_every_gradient(kv_heads, sequence_parallel):
    run_distributed(tp_workers.llama_gradients, 2, kv_heads, sequence_parallel)


def test_grouped_query_attention_without_tp_divisibility_is_refused():
    from megatron.model.transformer import Attention

    with pytest.raises(ValueError, match="num_kv_heads 3 must divide num_attention_heads 8"):
        Attention(tp_workers.llama_config(3), torch.Generator(), "cpu")


def test_activations_are_gpt_neox_formulas():
    x = torch.linspace(-4, 4, 41)
    expected = {
        "gelu": F.gelu(x), "relu": x.clamp(min=0), "softsign": x / (1 + x.abs()), "swish": x * torch.sigmoid(x),
        "mish": x * torch.tanh(F.softplus(x)), "silu": x * torch.sigmoid(x), "swiglu": x * torch.sigmoid(x),
        "geglu": F.gelu(x), "reglu": x.clamp(min=0), "bilinear": x, "glu": torch.sigmoid(x),
    }
    for name, want in expected.items():
        fn, gated = activation(name)
        assert gated == (name in ("swiglu", "geglu", "reglu", "bilinear", "glu"))
        torch.testing.assert_close(fn(x), want, msg=name)
    tanh_gelu, _ = activation("gelu", bias_gelu_fusion=True)
    torch.testing.assert_close(tanh_gelu(x), 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3))))
    with pytest.raises(ValueError, match="activation 'gelu2'"):
        activation("gelu2")


def test_gated_mlp_is_gate_activation_times_value():
    """dense_h_to_4h's first half is the value, the second the gate: out = W2 (f(gate) * value)."""
    from megatron.model.transformer import MLP

    for name, f in (("swiglu", F.silu), ("geglu", F.gelu), ("reglu", F.relu), ("bilinear", lambda t: t),
                    ("glu", torch.sigmoid)):
        mlp = MLP(tp_workers.llama_config(None, activation=name), 24, torch.Generator().manual_seed(0), "cpu")
        x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
        value, gate = (x @ mlp.dense_h_to_4h.weight.T).chunk(2, dim=-1)
        torch.testing.assert_close(mlp(x), (f(gate) * value) @ mlp.dense_4h_to_h.weight.T, msg=name)


def test_attention_config_expansion():
    assert expand_attention_config(None, 3) == ["global"] * 3
    assert expand_attention_config([[["global", "flash"], 2]], 4) == ["global", "flash", "global", "flash"]
    assert expand_attention_config([[["flash"], "all"]], 5) == ["flash"] * 5
    assert expand_attention_config([[["global"], 1], [["flash"], 2]], 3) == ["global", "flash", "flash"]
    assert expand_attention_config(["flash", "global"], 2) == ["flash", "global"]
    assert expand_attention_config([["flash", 2]], 2) == ["flash", "flash"]
    with pytest.raises(ValueError, match="attention type 'sparse_fixed' is not implemented"):
        expand_attention_config([[["global", "sparse_fixed"], 2]], 4)
    with pytest.raises(ValueError, match="gives 2 layer types for num_layers 4"):
        expand_attention_config([[["flash"], 2]], 4)
    with pytest.raises(ValueError, match="attention type 'local'"):
        layer_defs(tp_workers.llama_config(None, attention_config=[[["local"], 2]]), VOCAB, 96, 16, seed=0)


def test_grouped_query_generation_equals_transformers_and_caches_kv_heads():
    """Greedy tokens of left-padded prompts with the key/value cache (which holds the 2 key/value
    heads, not the 8 query heads) and without it equal LlamaForCausalLM.generate's."""
    from megatron.generation.generator import generate, new_caches

    m = tp_workers.llama_config(2, seq_length=32, init_method="small_init")
    ours = GPTModel(layer_defs(m, VOCAB, 96, 32, seed=3, vocab_size=VOCAB)).eval()
    hf = llama_twin(m, ours, 96)
    assert new_caches(ours, 3, 32, torch.float32, torch.device("cpu"))[0].keys.shape == (3, 2, 32, 8)
    prompts, eod, new = [[5, 9, 17, 33, 2, 8], [7, 1], [60, 61, 62]], VOCAB - 1, 12
    longest = max(map(len, prompts))
    ids = torch.tensor([[eod] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eod,
                       pad_token_id=eod)[:, longest:].tolist()
    want = [row[:row.index(eod) + 1] if eod in row else row for row in want]
    assert any(len(row) == new for row in want)
    for recompute in (False, True):
        got = generate(ours, prompts, new, eod=eod, vocab_size=VOCAB, max_positions=32, recompute=recompute)
        assert [c.tokens + [eod] * c.finished for c in got] == want


def test_flops_per_token_counts_the_gated_mlp_and_grouped_query_attention():
    """Training FLOPs = 3 x forward, forward = 2 x each matmul weight + attention scores 4sh per
    layer: the weights taken from the Llama-2-70B model itself (a [v; g] MLP, smaller k and v)."""
    from megatron.training.flops import flops_per_token

    m = _llama(num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8, intermediate_size=86016,
               mlp_multiple_of=4096)
    model = GPTModel(layer_defs(m, 32000, 28672, 4096, seed=0, device="meta", vocab_size=32000))
    layer_matmul = sum(p.numel() for p in model.layers[1].parameters() if p.dim() == 2)
    s, h = 4096, 8192
    expected = 3 * (80 * (2 * layer_matmul + 4 * s * h) + 2 * h * 32000)
    assert flops_per_token(80, h, s, 32000, 28672, gated=True, kv_hidden_size=8 * 128) == expected
    # h 2, kv width 1, f 3: weights qkv 2 x (2 + 2 x 1), dense 2 x 2, MLP 3 x 2 x 3; scores 4 x 4 x 2; output 2 x 2 x 8
    assert flops_per_token(1, 2, 4, 8, 3, gated=True, kv_hidden_size=1) == 3 * (2 * (8 + 4 + 18) + 32 + 32)
