"""Config merging, derivation and every validation error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from megatron.config import ConfigError, deepspeed_config, load_config
from megatron.config.deepspeed import framework_clips
from megatron.config.loader import read_yaml
from megatron.config.validate import check_launchable
from megatron.config.schema import GROUPS

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
    "tokenizer_type": "CharLevelTokenizer", "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 3, "train_iters": 10,
    # This framework's former defaults, which these tests were written for; GPT-NeoX's differ.
    "pos_emb": "rotary", "pipe_parallel_size": 1, "weight_decay": 0.01, "lr_decay_style": "cosine",
}


def write(tmp_path: Path, name: str, values: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def load(tmp_path: Path, extra: dict | None = None, world_size: int | None = 1, **kw):
    return load_config([write(tmp_path, "c.yml", {**BASE, **(extra or {})})], world_size=world_size,
                       require_files=False, **kw)


def error(tmp_path: Path, extra: dict, world_size: int = 1, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra, world_size, **kw)
    return str(info.value)


def test_20b_with_local_setup_merges_and_plans():
    cfg = load_config([str(ROOT / "configs/20B.yml"), str(ROOT / "configs/local_setup.yml")], require_files=False)
    d = cfg.derived
    assert (d.world_size, d.data_parallel_size, d.train_batch_size) == (96, 12, 1536)
    assert (d.micro_batch_size, d.gradient_accumulation_steps) == (4, 32)
    assert (d.vocab_size, d.padded_vocab_size, d.precision) == (50277, 50432, "fp16")
    assert d.warmup_iters == 1500 and d.lr == pytest.approx(9.7e-5)
    assert cfg.model.rotary_pct == 0.25 and cfg.model.gpt_j_residual and cfg.model.no_weight_tying
    assert cfg.data.vocab_file == "data/20B_tokenizer.json"


def test_later_file_overrides_and_is_reported(tmp_path):
    a = write(tmp_path, "a.yml", {**BASE, "hidden_size": 64, "fp16": {"enabled": True, "initial_scale_power": 12},
                                  "zero_optimization": {"stage": 1}})
    b = write(tmp_path, "b.yml", {"hidden-size": 128, "fp16": {"initial_scale_power": 8}})
    cfg = load_config([a, b], world_size=1, require_files=False)
    assert cfg.model.hidden_size == 128
    assert cfg.optimizer.fp16.enabled and cfg.optimizer.fp16.initial_scale_power == 8  # nested merge
    assert sorted(str(o) for o in cfg.overrides) == [
        f"fp16.initial_scale_power: 12 ({a}) -> 8 ({b})", f"hidden_size: 64 ({a}) -> 128 ({b})"]


def test_unknown_key_names_closest(tmp_path):
    msg = error(tmp_path, {"num_layer": 3})
    assert "unknown config key 'num_layer'" in msg and "'num_layers'" in msg
    msg = error(tmp_path, {"zero_optimization": {"stgae": 1}})
    assert "zero_optimization.stgae" in msg and "zero_optimization.stage" in msg


@pytest.mark.parametrize("text, expected", [
    ("num_layers: 2\nhidden_size: 64\nnum_layers: 3\n",
     "line 3: key 'num_layers' appears twice in one file (first on line 1)"),
    ("num_layers: 2\nnum-layers: 3\n",
     "line 2: key 'num-layers' appears twice in one file (first on line 1 as 'num_layers'; "
     "hyphens and underscores spell the same key)"),
    # Nested blocks too, where yaml.safe_load would keep the later value silently.
    ("zero_optimization:\n  stage: 1\n  reduce_bucket_size: 8\n  stage: 2\n",
     "line 4: key 'stage' appears twice in one file (first on line 2)"),
    ("fp16:\n  enabled: true\n  loss-scale: 0\n  loss_scale: 128\n",
     "line 4: key 'loss_scale' appears twice in one file (first on line 3 as 'loss-scale'; "
     "hyphens and underscores spell the same key)"),
])
def test_same_key_twice_in_one_file(tmp_path, text, expected):
    path = tmp_path / "dup.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config([str(path)], require_files=False)
    assert str(info.value) == f"{path} {expected}"


def test_same_key_in_two_blocks_or_over_a_yaml_merge_is_fine(tmp_path):
    path = tmp_path / "ok.yml"
    path.write_text("a:\n  stage: 1\nb:\n  stage: 2\nbase: &b {x-y: 1, z: 2}\nc:\n  <<: *b\n  x_y: 5\n")
    assert read_yaml(path) == {"a": {"stage": 1}, "b": {"stage": 2}, "base": {"x_y": 1, "z": 2},
                               "c": {"x_y": 5, "z": 2}}


def test_wrong_type(tmp_path):
    assert "num_layers" in error(tmp_path, {"num_layers": "two"}) and "expected int" in error(tmp_path, {"num_layers": "two"})


@pytest.mark.parametrize("given, expected", [
    ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": None}, (12, 2, 3)),
    ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": 3}, (12, 2, 3)),
    ({"train_batch_size": None, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, (12, 2, 3)),
])
def test_batch_triple_any_two_give_third(tmp_path, given, expected):
    d = load(tmp_path, given, world_size=2).derived
    assert (d.train_batch_size, d.micro_batch_size, d.gradient_accumulation_steps) == expected
    assert d.data_parallel_size == 2


@pytest.mark.parametrize("gpus, extra, expected", [
    (0, {"model_parallel_size": 2, "pipe_parallel_size": 2}, 4),  # CPU only: TP x PP
    (8, {"model_parallel_size": 2, "pipe_parallel_size": 2}, 8),  # one process per GPU
    (8, {"num_gpus": 4}, 4),                                      # num_gpus wins
    (8, {"num_nodes": 2, "hostfile": "hosts"}, 16),              # per node
])
def test_default_world_size(tmp_path, monkeypatch, gpus, extra, expected):
    """The launcher decides the layout from the machine; load_config only takes it."""
    import megatron.launcher.environment as environment

    monkeypatch.setattr(environment, "gpus_on_this_node", lambda: gpus)
    path = write(tmp_path, "c.yml", {**BASE, **extra})
    nodes, per_node = environment.node_layout([path], environ={})
    d = load_config([path], world_size=nodes * per_node, num_nodes=nodes, require_files=False).derived
    assert d.world_size == expected and d.num_nodes == extra.get("num_nodes", 1)
    tp_pp = extra.get("model_parallel_size", 1) * extra.get("pipe_parallel_size", 1)
    assert d.data_parallel_size == expected // tp_pp


def test_world_size_unset_is_what_the_config_asks_for(tmp_path):
    """Without a caller's world size nothing looks at the machine: num_nodes x (num_gpus or TP x PP)."""
    assert load(tmp_path, {"model_parallel_size": 2, "pipe_parallel_size": 2}, world_size=None).derived.world_size == 4
    d = load(tmp_path, {"num_gpus": 3, "num_nodes": 2}, world_size=None).derived
    assert (d.world_size, d.num_nodes, d.procs_per_node) == (6, 2, 3)


def test_batch_triple_disagreement(tmp_path):
    msg = error(tmp_path, {"train_batch_size": 10}, world_size=2)
    assert msg == ("train_batch_size 10 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 3 "
                   "x data-parallel size 2 (= 12)")
    msg = error(tmp_path, {"train_batch_size": 10, "gradient_accumulation_steps": None}, world_size=2)
    assert msg == "train_batch_size 10 is not divisible by train_micro_batch_size_per_gpu 2 x data-parallel size 2"


@pytest.mark.parametrize("extra, world, expected", [
    ({"model_parallel_size": 2, "pipe_parallel_size": 2}, 6,
     "world size 6 is not divisible by model_parallel_size 2 x pipe_parallel_size 2 = 4"),
    ({"num_attention_heads": 5}, 1, "hidden_size 64 is not divisible by num_attention_heads 5"),
    ({"model_parallel_size": 8}, 8, "num_attention_heads 4 is not divisible by model_parallel_size 8"),
    ({"pipe_parallel_size": 4}, 4, "num_layers 2 is fewer than pipe_parallel_size 4 stages"),
    ({"seq_length": 64, "max_position_embeddings": 32}, 1, "seq_length 64 exceeds max_position_embeddings 32"),
    ({"rotary_pct": 0.1}, 1, "rotary_pct 0.1 of head dim 16 gives 1 rotary dims; it must be a positive even number"),
    ({"norm": "batchnorm"}, 1, "norm is 'batchnorm'; choose one of 'layernorm', 'rmsnorm', "
     "'non_parametric_layernorm', 'scalenorm', 'te_rmsnorm', 'te_layernorm'"),
    ({"activation": "swigl"}, 1, "activation is 'swigl'; choose one of 'gelu', 'geglu', 'relu', 'softsign', 'swish', "
     "'mish', 'silu', 'reglu', 'swiglu', 'bilinear', 'glu'"),
    ({"optimizer": {"type": "Adamax"}}, 1, "optimizer.type is 'Adamax'; choose one of Adam, AdamW, SGD"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}, 1,
     "fp16 and bf16 are both enabled: choose one"),
    ({"zero_optimization": {"stage": 2}}, 1,
     "zero_optimization.stage 2 cannot run with pipe_parallel_size 1: DeepSpeed's pipeline engine supports "
     "ZeRO 0 and 1 only; set pipe_parallel_size: 0 (no pipeline) or stage: 1"),
    ({"train_iters": None}, 1, "set train_iters or train_tokens"),
    ({"hidden_dropout": 1.5}, 1, "hidden_dropout must be in [0, 1), got 1.5"),
    ({"sequence_parallel": True, "model_parallel_size": 3, "num_attention_heads": 6, "hidden_size": 96,
      "seq_length": 32}, 3, "sequence_parallel: seq_length 32 is not divisible by model_parallel_size 3"),
    ({"compile_loss": True, "model_parallel_size": 2}, 2,
     "compile_loss needs model_parallel_size 1, got 2: the vocabulary-parallel loss communicates inside its "
     "autograd function; set compile_loss: false"),
    ({"intermediate_size": 129, "model_parallel_size": 2}, 2,
     "intermediate_size 129 is not divisible by model_parallel_size 2"),
    ({"zero_optimization": {"stage": 4}}, 1, "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ({"optimizer": {"type": "Adam", "params": {"beta": 0.9}}}, 1,
     "unknown config key 'optimizer.params.beta' (in {file}); did you mean 'optimizer.params.betas', "
     "'optimizer.params.eps', 'optimizer.params.lr'?"),
    ({"optimizer": {"type": "Adam", "params": {"momentum": 0.9}}}, 1, "optimizer.params.momentum only applies to SGD"),
    ({"precision": "fp32", "fp16": {"enabled": True}}, 1, "precision 'fp32' disagrees with the fp16/bf16 blocks ('fp16')"),
    ({"precision": "fp16", "bf16": {"enabled": True}}, 1,
     "precision 'fp16' disagrees with the fp16/bf16 blocks ('bfloat16')"),
    ({"train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": None}, 1,
     "set two of train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": None}, 2,
     "train_batch_size 10 is not divisible by gradient_accumulation_steps 3 x data-parallel size 2"),
    ({"model_parallel_size": 0}, 1, "model_parallel_size must be >= 1 and pipe_parallel_size >= 0 (got 0, 1)"),
    ({"train_iters": 0}, 1, "train_iters must be >= 1, got 0"),
])
def test_validation_errors(tmp_path, extra, world, expected):
    assert error(tmp_path, extra, world_size=world) == expected.format(file=tmp_path / "c.yml")


@pytest.mark.parametrize("extra, expected", [
    ({}, "set data_path (or train_data_paths) to a preprocessed dataset prefix"),
    ({"tokenizer_type": "HFTokenizer"}, "tokenizer_type HFTokenizer needs vocab_file"),
    ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "c.yml"}, "tokenizer_type GPT2BPETokenizer needs merge_file"),
    ({"data_path": "a", "train_data_paths": ["b"]}, "set either data_path or train_data_paths, not both"),
    ({"data_impl": "stream", "data_path": "a"}, "data_impl 'stream' reads raw files: set train_data_paths (not data_path)"),
    ({"data_impl": "stream", "train_data_paths": ["a"], "train_data_weights": [1.0]},
     "data_impl 'stream' does not blend: remove the *_data_weights keys"),
])
def test_data_and_tokenizer_errors(tmp_path, monkeypatch, extra, expected):
    monkeypatch.chdir(tmp_path)  # relative file names below resolve here
    with pytest.raises(ConfigError) as info:
        load_config([write(tmp_path, "c.yml", {**BASE, **extra})])
    assert str(info.value) == expected


def test_config_file_errors(tmp_path):
    def message(text: str) -> str:
        path = tmp_path / "bad.yml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config([str(path)], world_size=1, require_files=False)
        return str(info.value)

    with pytest.raises(ConfigError, match=f"^config file not found: {tmp_path}/none.yml$"):
        load_config([str(tmp_path / "none.yml")])
    assert message("num_layers: [1,\n").startswith(f"{tmp_path}/bad.yml: not valid YAML: ")
    assert message("- num_layers\n") == f"{tmp_path}/bad.yml: expected a mapping of keys to values, got list"
    assert message("num_layers: null\n") == f"num_layers (in {tmp_path}/bad.yml): must not be null"
    assert message("zero_optimization: 3\n") == f"zero_optimization (in {tmp_path}/bad.yml): expected a mapping, got 3"
    assert message("num_layers: two\n") == f"num_layers (in {tmp_path}/bad.yml): expected int, got 'two'"


def test_multi_node_needs_a_hostfile(tmp_path):
    cfg = load(tmp_path, {"num_nodes": 2}, world_size=2)
    with pytest.raises(ConfigError, match="^num_nodes 2 with launcher pdsh needs a hostfile listing the nodes \\(or launcher: slurm, which needs none\\)$"):
        check_launchable(cfg)


def test_zero3_without_pipeline_is_fine(tmp_path):
    cfg = load(tmp_path, {"zero_optimization": {"stage": 3}, "pipe_parallel_size": 0, "bf16": {"enabled": True}})
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}


def test_mixed_precision_at_zero_stage_0_runs_stage_1(tmp_path):
    """DeepSpeed 0.19 never scales the fp16 loss at stage 0 (FACTS-style pitfall, docs/neox_compat.md):
    GPT-NeoX's configs that ask for it (Pythia 14M/31M) run at stage 1, the same updates."""
    for block in ({"fp16": {"enabled": True}}, {"precision": "bfloat16"}):
        cfg = load(tmp_path, {**block, "zero_optimization": {"stage": 0}})
        assert (cfg.derived.zero_stage, deepspeed_config(cfg)["zero_optimization"]["stage"]) == (1, 1)
        assert not framework_clips(cfg)
    fp32 = load(tmp_path, {"zero_optimization": {"stage": 0}})
    assert (fp32.derived.zero_stage, deepspeed_config(fp32)["zero_optimization"]["stage"]) == (0, 0)


def test_train_tokens_gives_iterations(tmp_path):
    d = load(tmp_path, {"train_iters": None, "train_tokens": 6 * 32 * 10 + 1}).derived
    assert d.train_iters == 11


def test_missing_files_name_the_path(tmp_path):
    path = write(tmp_path, "c.yml", {**BASE, "tokenizer_type": "HFTokenizer", "vocab_file": "nope/tok.json",
                                     "data_path": "nope/data"})
    with pytest.raises(ConfigError, match="vocab_file: file not found: nope/tok.json"):
        load_config([path])
    path = write(tmp_path, "d.yml", {**BASE, "data_path": str(tmp_path / "missing_text_document")})
    with pytest.raises(ConfigError, match=f"data_path: file not found: {tmp_path}/missing_text_document.bin"):
        load_config([path])


def test_deepspeed_json_from_yaml(tmp_path):
    cfg = load(tmp_path, {"fp16": {"enabled": True, "initial_scale_power": 12, "hysteresis": 2},
                          "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}, "gradient_clipping": 0.5},
               world_size=2)
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0.0, "loss_scale_window": 1000,
                          "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1.0}
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    # fp32 without ZeRO: DeepSpeed would clip and drop the norm; the framework clips instead.
    fp32_zero0 = load(tmp_path, {"zero_optimization": {"stage": 0}, "gradient_clipping": 0.5}, world_size=2)
    assert framework_clips(fp32_zero0) and deepspeed_config(fp32_zero0)["gradient_clipping"] == 0.0


def test_every_key_is_documented():
    for cls in list(GROUPS.values()):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no documentation"


def test_config_reference_is_up_to_date():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "tools/config_reference.py", "--check"], cwd=ROOT)
    assert proc.returncode == 0, "docs/config.md is stale: run python tools/config_reference.py"


def test_vocab_size_must_match_the_tokenizer(tmp_path, char_data):
    from helpers import tiny_config
    from megatron.training.setup import worker_config

    with pytest.raises(ConfigError) as info:
        worker_config([tiny_config(tmp_path, char_data, vocab_size=100)])
    assert str(info.value) == "vocab_size 100 in the config but the tokenizer (CharLevelTokenizer) has 257 entries"
