"""Any checkpoint into any layout: reshard.py is lossless, training starts from ours and from
GPT-NeoX's release layout at other tensor/pipeline sizes with the same first loss."""

from __future__ import annotations

import pickle

import pytest
import torch

from helpers import metrics, run_cli, tiny_config
from megatron.checkpointing.errors import CheckpointError
from megatron.checkpointing.loading import local_layers
from megatron.checkpointing.reader import CheckpointReader
from megatron.checkpointing.safe_load import load_file
from megatron.config.schema import ModelConfig
from megatron.model import GPTModel, layer_defs
from neox_checkpoint import write_neox_checkpoint
from tools.ckpts import inspect_checkpoint, reshard

VOCAB = 257  # the char-level tokenizer
COMMON = dict(train_iters=1, eval_interval=100, checkpoint_factor=None, save=None, zero_optimization={"stage": 1})


@pytest.fixture(scope="module")
def source(tmp_path_factory, char_data):
    """Our checkpoint after 2 steps at TP2 x PP2 (4 processes)."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = tiny_config(tmp, char_data, "src", train_iters=2, checkpoint_factor=2, eval_interval=100,
                      model_parallel_size=2, pipe_parallel_size=2, num_gpus=4, master_port=29051,
                      zero_optimization={"stage": 1})
    proc = run_cli("deepy.py", "train.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "src" / "ckpt"


def first_loss(tmp_path, name: str) -> float:
    records = metrics(tmp_path / name / "logs")
    assert len(records) >= 1
    return records[0]["lm_loss"]


def train(tiny, name: str, **kw) -> str:
    cfg = tiny(name, **{**COMMON, **kw})
    procs = kw.get("num_gpus", 1)
    proc = run_cli("deepy.py", "train.py", cfg) if procs > 1 else run_cli("train.py", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_reshard_is_lossless_and_inspectable(source, tmp_path, capsys):
    plain, back = tmp_path / "plain1", tmp_path / "tp4pp1"
    assert reshard.main(["--input", str(source), "--output", str(plain), "--tp", "1", "--pp", "0"]) == 0
    assert reshard.main(["--input", str(plain), "--output", str(back), "--tp", "4", "--pp", "1"]) == 0
    a, b, c = CheckpointReader(source), CheckpointReader(plain), CheckpointReader(back)
    assert (b.layout, b.tp, c.layout, c.tp, c.iteration) == ("plain", 1, "pipe", 4, 2)
    assert a.numbers == b.numbers == c.numbers == [0, 2, 3, 5, 6]
    for number in a.numbers:
        whole = [r.layer(number, parallel_residual=True) for r in (a, b, c)]
        assert whole[0].keys() == whole[1].keys() == whole[2].keys()
        for key, tensor in whole[0].items():  # real vocabulary rows are bit-identical
            assert torch.equal(tensor[:VOCAB], whole[1][key][:VOCAB]) and torch.equal(tensor[:VOCAB], whole[2][key][:VOCAB])
    # padding follows the layout: 512 rows at TP2 and TP4 (multiple of 128 x tp), 384 at TP1
    assert [r.layer(0, True)["word_embeddings.weight"].shape[0] for r in (a, b, c)] == [512, 384, 512]
    capsys.readouterr()
    assert inspect_checkpoint.main([str(back)]) == 0
    out = capsys.readouterr().out
    assert "layout       pipeline, 1 stage(s), tensor parallel 4" in out
    assert "optimizer    none (weights only)" in out and "vocabulary   257" in out
    assert "  attention.dense.weight                        float32   [64, 16] | [64, 16] | [64, 16] | [64, 16]" in out


def test_training_starts_from_any_layout(source, tiny, tmp_path):
    """finetune: the same weights give the same first loss at TP1 (pipeline engine and plain) and
    TP2; `load` from another layout resumes the iteration with weights only, and says so."""
    losses = []
    for name, kw in {"tp1": {}, "plain": dict(pipe_parallel_size=0),
                     "tp2": dict(model_parallel_size=2, num_gpus=2, master_port=29052)}.items():
        train(tiny, name, load=str(source), finetune=True, **kw)
        losses.append(first_loss(tmp_path, name))
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)
    out = train(tiny, "resume", load=str(source), train_iters=3)
    assert (f"resumed from {source} at iteration 2 (16 samples consumed; resharded from this framework, pipe "
            "layout, TP 2 x PP 2 x DP 1 to TP 1 x PP 1 x DP 1: weights only (optimizer state not resharded; "
            "optimizer and RNG start fresh))") in out
    assert [r["iteration"] for r in metrics(tmp_path / "resume" / "logs")] == [3]


def neox_layers(model: ModelConfig, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """A seeded model's layers with every bias and norm perturbed (nothing is left at its init)."""
    ours = GPTModel(layer_defs(model, 512, 4 * model.hidden_size, model.seq_length, seed, vocab_size=VOCAB))
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for number, module in local_layers(ours):
        tensors = {k: v.clone() for k, v in module.state_dict().items()}
        for key, value in tensors.items():
            if value.dim() == 1 and not key.endswith("inv_freq"):
                value += 0.1 * torch.randn(value.shape, generator=gen)
        layers[number] = tensors
    return layers


@pytest.fixture(scope="module")
def neox_release(tmp_path_factory):
    """The 20B release layout (TP2, 4 stages' worth of engine files, old names, inv_freq,
    summed bias shares), written from a known model; and the same model with current names."""
    tmp = tmp_path_factory.mktemp("neox")
    arch = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, rotary_pct=0.25,
                gpt_j_residual=True, no_weight_tying=True)
    layers = neox_layers(ModelConfig(**arch, pos_emb="rotary"), seed=11)
    config = {**arch, "tokenizer_type": "CharLevelTokenizer", "pos-emb": "rotary", "model-parallel-size": 2,
              "pipe-parallel-size": 4, "attention_config": [[["global"], 2]]}  # GPT-NeoX keys we need not know
    old = write_neox_checkpoint(tmp / "old", layers, config)
    new = write_neox_checkpoint(tmp / "new", layers, config, new_names=True)
    return layers, old.parent, new.parent


def test_gpt_neox_files_read_back_to_the_model(neox_release):
    layers, old, new = neox_release
    a, b = CheckpointReader(old), CheckpointReader(new)
    assert not a.is_ours and (a.tp, a.pipe_parallel_size, a.iteration, a.numbers) == (2, 4, 150, [0, 2, 3, 5, 6])
    for number, tensors in layers.items():
        expected = {k: v for k, v in tensors.items() if not k.endswith("inv_freq")}
        for reader in (a, b):
            got = reader.layer(number, parallel_residual=True)
            assert got.keys() == expected.keys()
            for key in expected:  # the row-parallel biases come back only as the sum of the shares
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    taken_one = a.layer_shards(2)[0]["attention.dense.bias"]
    assert (taken_one - layers[2]["attention.dense.bias"]).abs().max() > 0.1


def test_gpt_neox_release_finetunes_at_tp1_and_tp2(neox_release, tiny, tmp_path):
    """Same first loss from GPT-NeoX's layout at TP1 and TP2 as from our own copy of the model;
    `load` + `no_load_optim` takes the iteration from GPT-NeoX's client state."""
    layers, old, _ = neox_release
    ours = tmp_path / "ours"
    assert reshard.main(["--input", str(old), "--output", str(ours), "--tp", "1", "--pp", "1"]) == 0
    losses = []
    for name, kw in {"ref": dict(load=str(ours)), "tp1": dict(load=str(old)),
                     "tp2": dict(load=str(old), model_parallel_size=2, num_gpus=2, master_port=29053)}.items():
        train(tiny, name, finetune=True, seed=5, **kw)
        losses.append(first_loss(tmp_path, name))
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)
    out = train(tiny, "resume", load=str(old), no_load_optim=True, train_iters=151)
    assert "resumed from" in out and "at iteration 150 (1200 samples consumed; resharded from GPT-NeoX" in out


def test_wrong_architecture_is_refused(neox_release, tiny):
    _, old, _ = neox_release
    proc = run_cli("train.py", tiny("bad", **COMMON, load=str(old), finetune=True, num_layers=3))
    assert proc.returncode == 2
    assert "is another model: num_layers 2 in the checkpoint, 3 in the config" in proc.stderr


class Payload:
    """Stands for any object a file could smuggle in."""


def test_file_needing_code_is_refused(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": None, "thing": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"would unpickle .*Payload, which could run code; .* allow_unsafe"):
        load_file(path)
    assert isinstance(load_file(path, allow_unsafe=True)["thing"], Payload)
    path.write_bytes(pickle.dumps(1)[:3])
    with pytest.raises(CheckpointError, match="not a complete PyTorch checkpoint file"):
        load_file(path)


def test_zero3_resumes_natively_and_is_not_resharded(tiny, tmp_path):
    """ZeRO 3 writes no mp_rank files and partitions the weights: the same layout resumes through
    DeepSpeed with its optimizer; another layout is refused with the way out named."""
    z3 = dict(COMMON, pipe_parallel_size=0, zero_optimization={"stage": 3})
    train(tiny, "z3", **{**z3, "train_iters": 2, "save": str(tmp_path / "ck"), "checkpoint_factor": 2})
    out = train(tiny, "z3", **{**z3, "train_iters": 3, "load": str(tmp_path / "ck")})
    assert "at iteration 2 (16 samples consumed; same layout: weights, optimizer, scheduler and RNG)" in out
    proc = run_cli("train.py", tiny("other", **COMMON, load=str(tmp_path / "ck"), finetune=True))
    assert proc.returncode == 2
    assert "a ZeRO stage 3 checkpoint, whose weights are partitioned" in proc.stderr


@pytest.mark.parametrize("kv_heads", [2, None])
def test_gated_and_grouped_query_tensors_reshard_block_by_block(tmp_path, kv_heads):
    """A Llama-shaped model (SwiGLU, grouped-query attention when kv_heads is set) written at TP2
    holds in each rank's file exactly the weights the model builds on that rank ([value_r; gate_r],
    [q_r; k_r; v_r]), and reads back, merged, as the one-process model."""
    from megatron.checkpointing.writer import write_checkpoint
    from megatron.parallel.groups import TensorParallel

    m = ModelConfig(pos_emb="rotary",
                    num_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=kv_heads, seq_length=16,
                    norm="rmsnorm", activation="swiglu", use_bias_in_norms=False, use_bias_in_attn_linear=False,
                    use_bias_in_mlp=False, no_weight_tying=True, make_vocab_size_divisible_by=1)
    whole = GPTModel(layer_defs(m, 64, 96, 16, seed=4, vocab_size=64))
    layers = [(n, mod.state_dict()) for n, mod in local_layers(whole)]
    out = write_checkpoint(tmp_path / "ck", 1, layers, m, 64, tp=2, pp=1)
    for rank in range(2):
        built = GPTModel(layer_defs(m, 64, 96, 16, seed=4, vocab_size=64, tp=TensorParallel(2, rank)))
        for number, module in local_layers(built):
            stored = load_file(out / f"layer_{number:02d}-model_{rank:02d}-model_states.pt")
            for key, value in module.state_dict().items():
                if not key.endswith("inv_freq"):
                    assert torch.equal(stored[key], value), (number, key, rank)
    reader = CheckpointReader(tmp_path / "ck")
    for number, tensors in layers:
        merged = reader.layer(number, parallel_residual=False)
        assert merged.keys() == {k for k in tensors if not k.endswith("inv_freq")}
        assert all(torch.equal(merged[k], tensors[k]) for k in merged), number
