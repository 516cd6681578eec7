"""Hugging Face conversion both ways (tools/ckpts/convert_*.py): checkpoints trained at TP2 x PP2
give transformers the same logits as our model; HF -> ours -> HF is bit-identical; a converted
model fine-tunes from exactly transformers' loss; unusable inputs fail in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import metrics, run_cli, save_random_gpt_neox, tiny_config
from neox_checkpoint import write_neox_checkpoint
from megatron.checkpointing import hf as hf_map
from megatron.checkpointing.loading import load_weights, local_layers
from megatron.checkpointing.reader import CheckpointReader
from megatron.checkpointing.writer import write_checkpoint
from megatron.config import load_config
from megatron.config.schema import ModelConfig
from megatron.model import GPTModel, layer_defs
from megatron.parallel.groups import SINGLE
from megatron.tokenizer import build_tokenizer, pad_vocab_size
from megatron.training.setup import build_data
from tools.ckpts import convert_hf_to_neox, convert_neox_to_hf

transformers = pytest.importorskip("transformers")

VOCAB = 257  # the char-level tokenizer: padded to 512 at TP2, so padding rows exist
# Two training runs cover the shapes: residual, rotary fraction, tying, GELU flavour.
RUNS = {
    "A": dict(gpt_j_residual=True, rotary_pct=0.25, no_weight_tying=True, bias_gelu_fusion=True, master_port=29301),
    "B": dict(gpt_j_residual=False, rotary_pct=1.0, no_weight_tying=False, bias_gelu_fusion=False, master_port=29302),
}
# GPT-NeoX's spelling of run A, with keys this framework does not have (they must be ignored).
NEOX_CONFIG_A = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 64, "rotary-pct": 0.25,
                 "gpt-j-residual": True, "no-weight-tying": True, "bias-gelu-fusion": True, "pos-emb": "rotary",
                 "tokenizer-type": "CharLevelTokenizer", "attention-config": [[["global"], 2]],
                 "fp16": {"enabled": True}}
CONVERT_ARGS = {"A": ["--max-shard-mb", "0.05"], "B": ["--keep-padding"]}  # A: one file per layer


@pytest.mark.parametrize("kw", [dict(activation="relu", rotary_emb_base=500),
                                dict(bias_gelu_fusion=True, gpt_j_residual=True, no_weight_tying=True, rotary_pct=0.5)])
def test_config_maps_both_ways_and_computes_the_same(kw):
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96, seq_length=32,
                        max_position_embeddings=32, layernorm_epsilon=1e-6, pos_emb="rotary", **kw)
    assert hf_map.model_from_hf(hf_map.hf_config(model, 128, 96, 32)) == model
    ours = GPTModel(layer_defs(model, 128, 96, 32, seed=2)).eval()
    hf = hf_map.to_hf_model(model, ours, 128, 96, 32, "eager").eval()
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, char_data) -> dict[str, Path]:
    """Our checkpoints after 2 steps at TP2 x PP2 (4 processes each)."""
    tmp = tmp_path_factory.mktemp("trained")
    for name, kw in RUNS.items():
        cfg = tiny_config(tmp, char_data, name, train_iters=2, checkpoint_factor=2, eval_interval=100,
                          model_parallel_size=2, pipe_parallel_size=2, num_gpus=4, zero_optimization={"stage": 1}, **kw)
        proc = run_cli("deepy.py", "train.py", cfg)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {name: tmp / name / "ckpt" for name in RUNS}


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_trained_checkpoint_gives_transformers_the_same_logits(trained, name, tmp_path, capsys):
    kw, out = RUNS[name], tmp_path / "hf"
    argv = ["--input", str(trained[name]), "--output", str(out), *CONVERT_ARGS[name]]
    if name == "A":
        (tmp_path / "neox.yml").write_text(yaml.safe_dump(NEOX_CONFIG_A))
        argv += ["--config", str(tmp_path / "neox.yml")]
    assert convert_neox_to_hf.main(argv) == 0
    assert "tokenizer: CharLevelTokenizer has no Hugging Face tokenizer files; none written (eos/bos id 256)" \
        in capsys.readouterr().out
    rows = 512 if "--keep-padding" in argv else VOCAB
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "max_position_embeddings", "layer_norm_eps", "hidden_act",
                                   "use_parallel_residual", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                                   "rope_parameters", "dtype")} == {
        "vocab_size": rows, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": 64, "layer_norm_eps": 1e-5,
        "hidden_act": "gelu_fast" if kw["bias_gelu_fusion"] else "gelu",
        "use_parallel_residual": kw["gpt_j_residual"], "tie_word_embeddings": not kw["no_weight_tying"],
        "bos_token_id": 256, "eos_token_id": 256, "dtype": "float32",
        "rope_parameters": {"partial_rotary_factor": kw["rotary_pct"], "rope_theta": 10000, "rope_type": "default"}}
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    if name == "A":  # embedding, 2 layers, final norm, output: one shard each, all indexed
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert weights == sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00005.safetensors"
                                                                       for i in range(1, 6)]
        assert len(index["weight_map"]) == 1 + 2 * 12 + 2 + 1
    else:
        assert weights == ["model.safetensors"]

    reader = CheckpointReader(trained[name])
    model, _ = reader.model_config()
    ours = GPTModel(layer_defs(model, pad_vocab_size(VOCAB, 128, 1), 256, 64, seed=0, vocab_size=VOCAB)).eval()
    load_weights(ours, reader, model, SINGLE)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens)[..., :VOCAB], hf(tokens).logits
    assert b.shape == (2, 64, rows)
    assert (a - b[..., :VOCAB]).abs().max().item() < 1e-4
    assert a.std().item() > 0.1  # not a degenerate model


def test_gpt_neox_release_layout_converts(tmp_path):
    """GPT-NeoX's own files (TP2, 4 stages, 20B-era names, inv_freq, row-parallel biases as
    random shares that only their sum recovers) give transformers our model's logits."""
    arch = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, pos_emb="rotary",
                rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True)
    ours = GPTModel(layer_defs(ModelConfig(**arch), 512, 256, 64, seed=11, vocab_size=VOCAB)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # biases and norms start at 0 and 1: move them, or a wrong sum would pass
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    layers = {number: dict(module.state_dict()) for number, module in local_layers(ours)}
    write_neox_checkpoint(tmp_path / "neox", layers, {**arch, "tokenizer_type": "CharLevelTokenizer",
                                                      "attention_config": [[["global"], 2]]})
    assert convert_neox_to_hf.main(["--input", str(tmp_path / "neox"), "--output", str(tmp_path / "hf")]) == 0
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    tokens = torch.randint(0, VOCAB, (2, 64), generator=gen)
    with torch.no_grad():
        a, b = ours(tokens)[..., :VOCAB], hf(tokens).logits
    assert b.shape == (2, 64, VOCAB) and hf.config.eos_token_id == 256
    assert (a - b).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A saved GPTNeoXForCausalLM with random weights everywhere (norms and biases too) and a
    300-entry BPE tokenizer (eod 0): its vocabulary needs padding at TP2."""
    out = tmp_path_factory.mktemp("hf") / "source"
    assert save_random_gpt_neox(out, Path(json.__file__).read_text(), 300, max_positions=128, std=0.1) == 300
    return out


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("converted").resolve() / "ckpt"
    assert convert_hf_to_neox.main(["--input", str(hf_model), "--output", str(save), "--tp", "2", "--pp", "2"]) == 0
    return save


def test_hf_to_ours_to_hf_is_bit_identical(hf_model, converted, tmp_path):
    from safetensors.torch import load_file

    reader = CheckpointReader(converted)
    assert (reader.layout, reader.tp, reader.pipe_parallel_size, reader.iteration) == ("pipe", 2, 2, 0)
    assert not reader.tied
    assert reader.layer(0, True)["word_embeddings.weight"].shape == (512, 64)  # 300 padded for TP2
    run = yaml.safe_load((converted / "model.yml").read_text())
    assert run == {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 192,
                   "seq_length": 128, "max_position_embeddings": 128, "vocab_size": 300, "norm": "layernorm",
                   "layernorm_epsilon": 1e-6, "pos_emb": "rotary", "rotary_pct": 0.5, "rotary_emb_base": 5000,
                   "no_weight_tying": True, "gpt_j_residual": True, "activation": "gelu", "bias_gelu_fusion": True,
                   "hidden_dropout": 0.0, "attention_dropout": 0.0, "model_parallel_size": 2, "pipe_parallel_size": 2,
                   "tokenizer_type": "HFTokenizer", "vocab_file": str(converted / "tokenizer.json"),
                   "load": str(converted), "finetune": True}
    assert (reader.path / "configs" / "model.yml").read_text() == (converted / "model.yml").read_text()

    back = tmp_path / "back"
    assert convert_neox_to_hf.main(["--input", str(converted), "--output", str(back)]) == 0
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_model / "config.json").read_text())
    original, again = load_file(str(hf_model / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(original) == sorted(again) and "embed_out.weight" in again and len(again) == 28
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    assert (back / "tokenizer.json").read_bytes() == (hf_model / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(str(back))
    text = "def loads(s, *, cls=None):\n    return  s"
    assert tok(text).input_ids == build_tokenizer("HFTokenizer", str(hf_model / "tokenizer.json")).tokenize(text)
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)


@pytest.mark.slow
def test_converted_model_finetunes_from_the_transformers_loss(hf_model, converted, tmp_path, char_data):
    """`deepy.py train.py SAVE/model.yml data.yml` at TP2 x PP2: its first loss is transformers'
    loss on the same batch (the char-level ids of the data are all < 300, valid ids here)."""
    no_model_keys = dict.fromkeys(("num_layers", "hidden_size", "num_attention_heads", "rotary_pct", "gpt_j_residual",
                                   "no_weight_tying", "tokenizer_type", "pos_emb", "pipe_parallel_size"))
    data = tiny_config(tmp_path, char_data, "ft", **no_model_keys, train_iters=1, eval_interval=100, save=None,
                       checkpoint_factor=None, zero_optimization={"stage": 1}, master_port=29303)
    proc = run_cli("deepy.py", "train.py", str(converted / "model.yml"), data)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    first = metrics(tmp_path / "ft" / "logs")[0]["lm_loss"]

    cfg = load_config([str(converted / "model.yml"), data], world_size=4, vocab_size=300)
    train, _, _ = build_data(cfg)
    batch = torch.from_numpy(np.stack([train[i] for i in range(cfg.derived.train_batch_size)]).astype(np.int64))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_model), attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, 300), batch[:, 1:].reshape(-1)).item()
    assert batch.shape == (8, 65) and expected > 5.0
    assert first == pytest.approx(expected, rel=1e-5)


def test_unusable_inputs_fail_in_one_line(hf_model, converted, tmp_path, capsys):
    rms = ModelConfig(pos_emb="rotary",
                      num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=16, norm="rmsnorm")
    layers = [(n, {k: v for k, v in m.state_dict().items() if not k.endswith("inv_freq")})
              for n, m in local_layers(GPTModel(layer_defs(rms, 128, 256, 16, seed=0)))]
    write_checkpoint(tmp_path / "rms", 3, layers, rms, 128, tp=1, pp=1)
    silu = tmp_path / "silu"
    transformers.GPTNeoXConfig(hidden_act="silu").save_pretrained(str(silu))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    out = str(tmp_path / "out")
    cases = [
        (convert_neox_to_hf, ["--input", str(tmp_path / "rms"), "--output", out],
         "norm 'rmsnorm' cannot be converted to GPTNeoXForCausalLM: it has LayerNorm only"),
        (convert_neox_to_hf, ["--input", str(tmp_path), "--output", out],
         f"{tmp_path}: no `latest` file; pass the iteration to read"),
        (convert_neox_to_hf, ["--input", str(converted), "--output", str(hf_model)],
         f"{hf_model} exists and is not an empty directory; choose a new --output"),
        (convert_hf_to_neox, ["--input", str(silu), "--output", out, "--tp", "1", "--pp", "1"],
         "hidden_act 'silu': this framework has gelu (exact or tanh) and relu; this model cannot be converted"),
        (convert_hf_to_neox, ["--input", str(tmp_path / "bert"), "--output", out, "--tp", "1", "--pp", "1"],
         f"{tmp_path / 'bert' / 'config.json'}: model_type 'bert'; GPTNeoXForCausalLM (gpt_neox) and "
         "LlamaForCausalLM (llama, mistral) convert"),
        (convert_hf_to_neox, ["--input", str(hf_model), "--output", out, "--tp", "3", "--pp", "1"],
         "--tp 3 does not divide the 4 attention heads"),
        (convert_hf_to_neox, ["--input", str(tmp_path), "--output", out, "--tp", "1", "--pp", "1"],
         f"{tmp_path}: no config.json (expected a save_pretrained directory)"),
    ]
    for tool, argv, message in cases:
        assert tool.main(argv) == 2, message
        assert capsys.readouterr().err == f"error: {message}\n"
    assert sorted(os.listdir(tmp_path)) == ["bert", "rms", "silu"]  # nothing half-written
