"""GPT-NeoX's keys here: refused features, second spellings, implied settings, DeepSpeed's JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron.config import ConfigError, deepspeed_config, load_config
from megatron.config.blocks import OptimizerParams
from megatron.config.schema import DataConfig

BASE = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
    "tokenizer_type": "CharLevelTokenizer", "train_micro_batch_size_per_gpu": 2, "train_iters": 10,
}


def load(tmp_path: Path, extra: dict, world_size: int = 1):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    return load_config([str(path)], world_size=world_size, require_files=False)


def error(tmp_path: Path, extra: dict, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra, world_size)
    return str(info.value)


def refused(key: str, value: str, feature: str, fix: str) -> str:
    return f"{key}: {value} asks for {feature}, which this framework does not implement ({fix})"


@pytest.mark.parametrize("extra, expected", [
    ({"moe_num_experts": 8}, refused("moe_num_experts", "8", "mixture of experts", "leave it at 1")),
    ({"moe-num-experts": 8}, refused("moe_num_experts", "8", "mixture of experts", "leave it at 1")),
    ({"pos_emb": "alibi"}, refused("pos_emb", "alibi", "ALiBi attention biases", "choose 'learned', 'rotary' or 'none'")),
    ({"norm": "scalenorm"}, refused("norm", "scalenorm", "ScaleNorm", "choose 'layernorm' or 'rmsnorm'")),
    ({"optimizer": {"type": "lion"}}, refused("optimizer.type", "lion", "the Lion optimizer", "choose Adam, AdamW or SGD")),
    ({"sparsity_config": {"block": 16}}, refused("sparsity_config", '{"block": 16}', "DeepSpeed sparse attention",
                                                 "remove it")),
    ({"attention_config": [[["sparse_fixed"], 2]]},
     refused("attention_config", "sparse_fixed", "sparse_fixed attention layers", "use 'global' or 'flash'")),
    ({"use_comet": True}, refused("use_comet", "true", "Comet logging", "remove it")),
    ({"use_shared_fs": False}, refused("use_shared_fs", "false", "dataset indexes built on each node's own storage",
                                       "leave it at true")),
    ({"te_mha": True}, refused("te_mha", "true", "NVIDIA Transformer Engine layers", "leave it at false")),
    ({"train_impl": "dpo"}, refused("train_impl", "dpo",
                                    "preference/RL training (DPO, KTO, reward models, REINFORCE)", "leave it at normal")),
    ({"lr_decay_style": "exponential"}, refused("lr_decay_style", "exponential", "an exponential learning-rate decay",
                                                "choose 'constant', 'linear' or 'cosine'")),
    ({"activation": "swigl"}, "activation is 'swigl'; choose one of 'gelu', 'geglu', 'relu', 'softsign', 'swish', "
                              "'mish', 'silu', 'reglu', 'swiglu', 'bilinear', 'glu'"),
    ({"moe_num_expert": 8}, None),  # a misspelling still names the nearest keys
])
def test_unimplemented_features_are_refused_in_one_line(tmp_path, extra, expected):
    msg = error(tmp_path, extra)
    if expected is None:
        assert msg.startswith("unknown config key 'moe_num_expert'") and "'moe_num_experts'" in msg
    else:
        assert msg == expected


def test_features_left_at_gpt_neox_defaults_and_hints_are_accepted(tmp_path):
    cfg = load(tmp_path, {"moe_num_experts": 1, "use_mup": False, "mmap_warmup": True, "use_shared_fs": True,
                          "bias_dropout_fusion": True, "checkpoint_validation_with_forward_pass": True,
                          "git_hash": "abc", "rank": 0, "is_pipe_parallel": False})
    assert cfg.neox.mmap_warmup and cfg.neox.git_hash == "abc"


@pytest.mark.parametrize("extra, world, expected", [
    ({"global_num_gpus": 8}, 2, "global_num_gpus is 8 but the launched world size is 2; GPT-NeoX derives "
                                "global_num_gpus from it: remove global_num_gpus or make them agree"),
    ({"clip_grad": 0.5}, 1, "clip_grad is 0.5 but gradient_clipping is 1.0; GPT-NeoX derives clip_grad from it: "
                            "remove clip_grad or make them agree"),
    ({"lr": 0.1}, 1, "lr is 0.1 but optimizer.params.lr is 0.001; GPT-NeoX derives lr from it: remove lr or make "
                     "them agree"),
    ({"zero_stage": 2}, 1, "zero_stage is 2 but zero_optimization.stage is 0; GPT-NeoX derives zero_stage from it: "
                           "remove zero_stage or make them agree"),
    ({"batch_size": 4}, 1, "batch_size is 4 but train_micro_batch_size_per_gpu is 2; GPT-NeoX derives batch_size "
                           "from it: remove batch_size or make them agree"),
])
def test_second_spellings_must_agree(tmp_path, extra, world, expected):
    assert error(tmp_path, extra, world) == expected


def test_second_spellings_that_agree_load(tmp_path):
    cfg = load(tmp_path, {"global_num_gpus": 2, "world_size": 2, "clip_grad": 1.0, "lr": 3e-4, "batch_size": 2,
                          "optimizer_type": "adam", "optimizer": {"type": "ADAM", "params": {"lr": 3e-4}},
                          "zero_stage": 0, "gas": 1}, world_size=2)
    assert cfg.optimizer.optimizer.type == "Adam" and cfg.derived.lr == 3e-4


def test_precision_alone_turns_its_block_on(tmp_path):
    bf16 = load(tmp_path, {"precision": "bfloat16", "zero_optimization": {"stage": 1}})
    assert bf16.derived.precision == "bfloat16" and deepspeed_config(bf16)["bf16"] == {"enabled": True}
    fp16 = load(tmp_path, {"precision": "fp16", "zero_optimization": {"stage": 1}})
    assert deepspeed_config(fp16)["fp16"]["enabled"] and "bf16" not in deepspeed_config(fp16)
    assert load(tmp_path, {"fp16": {"type": "bfloat16"}, "zero_optimization": {"stage": 1}}).derived.precision == "bfloat16"


def test_fp32_allreduce_sets_deepspeeds_communication_type(tmp_path):
    on = load(tmp_path, {"fp32_allreduce": True, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}})
    assert deepspeed_config(on)["communication_data_type"] == "fp32"
    fp32 = load(tmp_path, {"fp32_allreduce": True})  # fp32 gradients are reduced in fp32 anyway
    assert "communication_data_type" not in deepspeed_config(fp32)


def test_deepspeed_keys_pass_through_and_unset_zero_keys_stay_deepspeeds(tmp_path):
    cfg = load(tmp_path, {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1000,
                                                "offload_param": {"device": "cpu", "pin_memory": True}},
                          "pipe_parallel_size": 0, "bf16": {"enabled": True}, "prescale_gradients": True,
                          "deepspeed_extra_args": {"comms_logger": {"enabled": True}}})
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {
        "stage": 3, "allgather_partitions": True, "allgather_bucket_size": 500_000_000, "overlap_comm": False,
        "reduce_scatter": True, "reduce_bucket_size": 500_000_000, "contiguous_gradients": False,
        "offload_param": {"device": "cpu", "pin_memory": True}, "stage3_max_live_parameters": 1000}
    assert ds["prescale_gradients"] is True and ds["comms_logger"] == {"enabled": True}
    msg = error(tmp_path, {"zero_optimization": {"stage": 1, "cpu_offload": True, "offload_optimizer": {"device": "cpu"}}})
    assert msg == ("zero_optimization sets both cpu_offload and offload_optimizer; keep one "
                   "(cpu_offload: true is offload_optimizer: {device: cpu})")


def test_typed_optimizer_params_have_gpt_neox_defaults(tmp_path):
    assert OptimizerParams() == OptimizerParams(lr=0.001, betas=[0.9, 0.999], eps=1e-8, momentum=0.0)
    sgd = load(tmp_path, {"optimizer": {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9}}})
    assert sgd.optimizer.optimizer.type == "SGD" and sgd.optimizer.optimizer.params.momentum == 0.9
    assert error(tmp_path, {"optimizer": {"params": {"momentum": 0.9}}}) == "optimizer.params.momentum only applies to SGD"


@pytest.mark.parametrize("extra, expected", [
    ({"checkpoint_factor": 2, "checkpoint_scale": "log", "train_iters": 100}, (1, 2, 4, 8, 16, 32, 64)),
    ({"checkpoint_factor": 4, "extra_save_iters": [0, 1, 2], "train_iters": 10}, (1, 2, 4, 8)),
])
def test_save_iterations(tmp_path, extra, expected):
    assert load(tmp_path, extra).derived.save_iters == expected


def test_lr_decay_fraction(tmp_path):
    assert load(tmp_path, {"lr_decay_fraction": 0.5}).derived.lr_decay_iters == 5
    assert error(tmp_path, {"lr_decay_fraction": 0.5, "lr_decay_iters": 4}) == \
        "set lr_decay_iters or lr_decay_fraction, not both"


def test_defaults_are_gpt_neox(tmp_path):
    cfg = load(tmp_path, {})
    assert (cfg.model.pos_emb, cfg.parallel.pipe_parallel_size, cfg.optimizer.weight_decay, cfg.lr.lr_decay_style,
            cfg.logging.log_interval, cfg.data.num_workers, cfg.data.data_impl,
            cfg.parallel.pipe_partition_method) == ("learned", 0, 0.1, "linear", 100, 2, "infer", "type:transformer|mlp")
    assert not cfg.derived.pipelined and cfg.derived.lr == 0.001
    assert DataConfig().tokenizer_type == "GPT2BPETokenizer"  # BASE names CharLevelTokenizer
