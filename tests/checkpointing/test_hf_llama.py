"""Hugging Face `LlamaForCausalLM` conversion both ways (tools/ckpts/convert_*.py dispatch on the
architecture): a random Llama, with and without grouped-query attention, converted to TP1 and TP2
checkpoints gives our model transformers' logits, and converts back bit-identical; what Llama
cannot express fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from megatron.checkpointing import hf_llama
from megatron.checkpointing.errors import CheckpointError
from megatron.checkpointing.loading import load_weights, local_layers
from megatron.checkpointing.reader import CheckpointReader
from megatron.checkpointing.writer import write_checkpoint
from megatron.config.config import mlp_width
from megatron.config.schema import ModelConfig
from megatron.model import GPTModel, layer_defs
from megatron.parallel.groups import SINGLE
from megatron.tokenizer import EOD_TOKEN, build_tokenizer, pad_vocab_size
from tools.ckpts import convert_hf_to_neox, convert_neox_to_hf

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

VOCAB, EOD = 400, 3  # the SentencePiece model's pieces; <|endoftext|> follows unk, bos, eos
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, bos_token_id=EOD, eos_token_id=EOD)


def save_random(config, out: Path) -> Path:
    """save_pretrained of a model with random weights everywhere (norms too, so a wrong norm
    mapping shows) and a SentencePiece tokenizer.model trained on json's sources as Llama's was
    (no normalisation, byte fallback)."""
    torch.manual_seed(0)
    model = (transformers.LlamaForCausalLM if config.model_type == "llama" else transformers.MistralForCausalLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(str(out))
    lines = Path(json.__file__).read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"),
                                   vocab_size=VOCAB, model_type="bpe", user_defined_symbols=[EOD_TOKEN],
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   byte_fallback=True, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    return out


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def llama(request, tmp_path_factory) -> Path:
    return save_random(transformers.LlamaConfig(**LLAMA, num_key_value_heads=request.param),
                       tmp_path_factory.mktemp("llama") / "source")


def our_logits(save: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Our model, built from the checkpoint's stored architecture and loaded on one process."""
    reader = CheckpointReader(save)
    model, vocab = reader.model_config()
    assert vocab == VOCAB
    ours = GPTModel(layer_defs(model, pad_vocab_size(VOCAB, 128, 1), mlp_width(model),
                               model.max_position_embeddings, seed=0, vocab_size=VOCAB)).eval()
    load_weights(ours, reader, model, SINGLE)
    with torch.no_grad():
        return ours(tokens)[..., :VOCAB]


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 0)])
def test_llama_to_ours_same_logits_and_back_bit_identical(llama, tp, pp, tmp_path):
    from safetensors.torch import load_file

    save = tmp_path / "ckpt"
    assert convert_hf_to_neox.main(["--input", str(llama), "--output", str(save), "--tp", str(tp),
                                    "--pp", str(pp)]) == 0
    kv = json.loads((llama / "config.json").read_text())["num_key_value_heads"]
    run = yaml.safe_load((save / "model.yml").read_text())
    assert {k: run[k] for k in ("num_kv_heads", "intermediate_size", "mlp_multiple_of", "norm", "rms_norm_epsilon",
                                "activation", "rotary_pct", "rotary_emb_base", "use_bias_in_norms",
                                "use_bias_in_attn_linear", "use_bias_in_mlp", "no_weight_tying", "gpt_j_residual",
                                "tokenizer_type", "vocab_file", "vocab_size", "model_parallel_size")} == {
        "num_kv_heads": None if kv == 4 else kv, "intermediate_size": 3 * 176, "mlp_multiple_of": 1,
        "norm": "rmsnorm", "rms_norm_epsilon": 1e-5, "activation": "swiglu", "rotary_pct": 1.0,
        "rotary_emb_base": 5000, "use_bias_in_norms": False, "use_bias_in_attn_linear": False,
        "use_bias_in_mlp": False, "no_weight_tying": True, "gpt_j_residual": False,
        "tokenizer_type": "SPMTokenizer", "vocab_file": str(save / "tokenizer.model"), "vocab_size": VOCAB,
        "model_parallel_size": tp}
    assert CheckpointReader(save).tp == tp

    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    ours, theirs = our_logits(save, tokens), hf_logits(llama, tokens)
    assert theirs.shape == (2, 64, VOCAB) and theirs.std().item() > 0.1  # not a degenerate model
    assert (ours - theirs).abs().max().item() < 1e-4

    back = tmp_path / "back"
    assert convert_neox_to_hf.main(["--input", str(save), "--output", str(back)]) == 0
    assert json.loads((back / "config.json").read_text()) == json.loads((llama / "config.json").read_text())
    original, again = load_file(str(llama / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(original) == sorted(again) and len(again) == 3 + 2 * 9
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    assert (back / "tokenizer.model").read_bytes() == (llama / "tokenizer.model").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(str(back))
    text = "def loads(s, *, cls=None):\n    return s"
    ours_tok = build_tokenizer("SPMTokenizer", str(llama / "tokenizer.model"))
    assert tok(text).input_ids == ours_tok.tokenize(text) and len(ours_tok.tokenize(text)) > 5
    assert tok.eos_token_id == EOD


def test_our_llama_shaped_model_computes_transformers_logits():
    """The in-memory mapping (`to_hf_model`, used by the benchmark), tied embeddings and GQA."""
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=2, intermediate_size=192,
                        mlp_multiple_of=16, seq_length=32, max_position_embeddings=32, norm="rmsnorm",
                        rms_norm_epsilon=1e-6, pos_emb="rotary", rotary_pct=1.0, activation="swiglu",
                        use_bias_in_norms=False, use_bias_in_attn_linear=False, use_bias_in_mlp=False)
    ffn = mlp_width(model)
    assert ffn == 64  # 192 * 2/3 / 2, a multiple of 16
    ours = GPTModel(layer_defs(model, 128, ffn, 32, seed=3)).eval()
    hf = hf_llama.to_hf_model(model, ours, 128, ffn, 32, "eager").eval()
    assert hf.config.tie_word_embeddings and hf.config.num_key_value_heads == 2
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < 1e-5


def test_mistral_without_sliding_window_converts(tmp_path):
    config = transformers.MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=None)
    source = save_random(config, tmp_path / "mistral")
    assert convert_hf_to_neox.main(["--input", str(source), "--output", str(tmp_path / "ckpt"), "--tp", "2",
                                    "--pp", "1"]) == 0
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    assert (our_logits(tmp_path / "ckpt", tokens) - hf_logits(source, tokens)).abs().max().item() < 1e-4


def test_what_llama_cannot_express_fails_in_one_line(llama, tmp_path, capsys):
    parallel = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=16, norm="rmsnorm",
                           activation="swiglu", pos_emb="rotary", gpt_j_residual=True, use_bias_in_norms=False,
                           use_bias_in_attn_linear=False, use_bias_in_mlp=False)
    layers = [(n, {k: v for k, v in m.state_dict().items() if not k.endswith("inv_freq")})
              for n, m in local_layers(GPTModel(layer_defs(parallel, 128, mlp_width(parallel), 16, seed=0)))]
    write_checkpoint(tmp_path / "parallel", 3, layers, parallel, 128, tp=1, pp=1)
    biased, window, scaled = tmp_path / "biased", tmp_path / "window", tmp_path / "scaled"
    transformers.LlamaConfig(attention_bias=True).save_pretrained(str(biased))
    transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
                             ).save_pretrained(str(scaled))
    transformers.MistralConfig(sliding_window=16, max_position_embeddings=64).save_pretrained(str(window))
    out = str(tmp_path / "out")
    cases = [
        (convert_neox_to_hf, ["--input", str(tmp_path / "parallel"), "--output", out],
         "gpt_j_residual True cannot be converted to LlamaForCausalLM: it has the sequential residual only"),
        (convert_hf_to_neox, ["--input", str(biased), "--output", out, "--tp", "1", "--pp", "1"],
         "attention_bias True: the converted model has no attention biases; this model cannot be converted"),
        (convert_hf_to_neox, ["--input", str(scaled), "--output", out, "--tp", "1", "--pp", "1"],
         "rope_parameters.rope_type 'linear': only plain rotary (rope_type 'default') is supported; this model "
         "cannot be converted"),
        (convert_hf_to_neox, ["--input", str(window), "--output", out, "--tp", "1", "--pp", "1"],
         "sliding_window 16: this framework's attention is full causal attention; this model cannot be converted"),
    ]
    if json.loads((llama / "config.json").read_text())["num_key_value_heads"] == 2:
        cases.append((convert_hf_to_neox, ["--input", str(llama), "--output", out, "--tp", "4", "--pp", "1"],
                      "--tp 4 does not divide the 2 key/value heads"))
    for tool, argv, message in cases:
        assert tool.main(argv) == 2, message
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    (dict(norm="layernorm"), "norm 'layernorm' cannot be converted to LlamaForCausalLM: it has RMSNorm only"),
    (dict(rotary_pct=0.25), "rotary_pct 0.25 cannot be converted to LlamaForCausalLM: it rotates whole heads "
                            "(rotary_pct 1)"),
    (dict(use_bias_in_mlp=True), "use_bias_in_mlp True cannot be converted to LlamaForCausalLM: the converted "
                                 "model has no MLP biases"),
    (dict(use_bias_in_norms=True), "use_bias_in_norms True cannot be converted to LlamaForCausalLM: its RMSNorm "
                                   "has no offset"),
])
def test_check_expressible_names_the_key(change, message):
    llama = dict(num_layers=1, hidden_size=64, num_attention_heads=4, norm="rmsnorm", activation="swiglu",
                 pos_emb="rotary", rotary_pct=1.0, use_bias_in_norms=False, use_bias_in_attn_linear=False,
                 use_bias_in_mlp=False)
    hf_llama.check_expressible(ModelConfig(**llama))
    with pytest.raises(CheckpointError) as err:
        hf_llama.check_expressible(ModelConfig(**{**llama, **change}))
    assert str(err.value) == message
