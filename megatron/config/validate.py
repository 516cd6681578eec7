"""Checks that run before anything launches. Each error names the keys and numbers that disagree."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.config.loader import ConfigError
from megatron.config.schema import (DataConfig, GenerationConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                                    TrainingConfig)

if TYPE_CHECKING:
    from megatron.config.config import Derived, NeoXConfig

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "norm"): ("layernorm", "rmsnorm"),
    ("model", "pos_emb"): ("rotary", "learned", "none"),
    ("model", "activation"): ("gelu", "relu", "softsign", "swish", "mish", "silu", "swiglu", "geglu", "reglu",
                              "bilinear", "glu"),
    ("model", "init_method"): ("normal", "scaled_normal", "small_init", "wang_init"),
    ("model", "output_layer_init_method"): ("normal", "scaled_normal", "small_init", "wang_init"),
    ("model", "output_layer_parallelism"): ("column",),
    ("lr", "lr_decay_style"): ("cosine", "linear", "constant"),
    ("data", "tokenizer_type"): ("HFTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer"),
    ("data", "data_impl"): ("mmap", "stream"),
    ("training", "distributed_backend"): ("nccl", "gloo", None),
    ("launcher", "launcher"): ("pdsh", "openmpi", "mvapich", "slurm"),
}
OPTIMIZERS = ("Adam", "AdamW", "SGD")
OPTIMIZER_PARAMS = ("lr", "betas", "eps", "momentum")


def check_choices(groups: dict[str, Any]) -> None:
    for (group, key), allowed in CHOICES.items():
        value = getattr(groups[group], key)
        if value not in allowed:
            raise ConfigError(f"{key} is {value!r}; choose one of {', '.join(map(repr, allowed))}")
    spec = groups["optimizer"].optimizer
    if spec.type not in OPTIMIZERS:
        raise ConfigError(f"optimizer.type is {spec.type!r}; choose one of {', '.join(OPTIMIZERS)}")
    for key in spec.params:
        if key not in OPTIMIZER_PARAMS:
            raise ConfigError(f"unknown optimizer.params key {key!r}; valid: {', '.join(OPTIMIZER_PARAMS)}")
    if spec.type != "SGD" and "momentum" in spec.params:
        raise ConfigError("optimizer.params.momentum only applies to SGD")


def _require(path: str | None, key: str) -> None:
    if path is not None and not Path(path).exists():
        raise ConfigError(f"{key}: file not found: {path}")


def data_prefixes(data: DataConfig) -> list[str]:
    prefixes = [data.data_path] if data.data_path else []
    for paths in (data.train_data_paths, data.valid_data_paths, data.test_data_paths):
        prefixes += list(paths or [])
    return prefixes


def check_files(data: DataConfig) -> None:
    """Missing data or tokenizer files fail here, before any process starts."""
    if data.tokenizer_type in ("HFTokenizer", "GPT2BPETokenizer"):
        if data.vocab_file is None:
            raise ConfigError(f"tokenizer_type {data.tokenizer_type} needs vocab_file")
        _require(data.vocab_file, "vocab_file")
    if data.tokenizer_type == "GPT2BPETokenizer":
        if data.merge_file is None:
            raise ConfigError("tokenizer_type GPT2BPETokenizer needs merge_file")
        _require(data.merge_file, "merge_file")
    if data.data_impl == "stream":
        if not data.train_data_paths or data.data_path:
            raise ConfigError("data_impl 'stream' reads raw files: set train_data_paths (not data_path)")
        if data.train_data_weights or data.valid_data_weights or data.test_data_weights:
            raise ConfigError("data_impl 'stream' does not blend: remove the *_data_weights keys")
        return
    if not data_prefixes(data):
        raise ConfigError("set data_path (or train_data_paths) to a preprocessed dataset prefix")
    if data.data_path and data.train_data_paths:
        raise ConfigError("set either data_path or train_data_paths, not both")
    for prefix in data_prefixes(data):
        for suffix in (".bin", ".idx"):
            _require(prefix + suffix, "data_path" if prefix == data.data_path else "*_data_paths")
    for which in ("train", "valid", "test"):
        paths, weights = getattr(data, f"{which}_data_paths"), getattr(data, f"{which}_data_weights")
        if weights is not None and len(weights) != len(paths or []):
            raise ConfigError(
                f"{which}_data_weights has {len(weights)} entries but {which}_data_paths has {len(paths or [])}"
            )


def check_model(model: ModelConfig, parallel: ParallelConfig, derived: "Derived") -> None:
    h, heads, tp = model.hidden_size, model.num_attention_heads, parallel.model_parallel_size
    if h % heads:
        raise ConfigError(f"hidden_size {h} is not divisible by num_attention_heads {heads}")
    if heads % tp:
        raise ConfigError(f"num_attention_heads {heads} is not divisible by model_parallel_size {tp}")
    if derived.intermediate_size % tp:
        raise ConfigError(f"intermediate_size {derived.intermediate_size} is not divisible by model_parallel_size {tp}")
    if model.seq_length > derived.max_position_embeddings:
        raise ConfigError(
            f"seq_length {model.seq_length} exceeds max_position_embeddings {derived.max_position_embeddings}"
        )
    if parallel.sequence_parallel and model.seq_length % tp:
        raise ConfigError(f"sequence_parallel: seq_length {model.seq_length} is not divisible by model_parallel_size {tp}")
    pp = derived.pipe_stages
    if model.num_layers < pp:
        raise ConfigError(f"num_layers {model.num_layers} is fewer than pipe_parallel_size {pp} stages")
    if model.pos_emb == "rotary":
        rot = int(h // heads * model.rotary_pct)
        if not 0 < model.rotary_pct <= 1 or rot % 2:
            raise ConfigError(
                f"rotary_pct {model.rotary_pct} of head dim {h // heads} gives {rot} rotary dims; "
                "it must be a positive even number"
            )
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0 <= getattr(model, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(model, key)}")


def check_precision(opt: OptimizerConfig, parallel: ParallelConfig, derived: "Derived") -> None:
    stage = opt.zero_optimization.stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if derived.pipelined and stage >= 2:
        raise ConfigError(
            f"zero_optimization.stage {stage} cannot run with pipe_parallel_size "
            f"{parallel.pipe_parallel_size}: DeepSpeed's pipeline engine supports ZeRO 0 and 1 only; "
            "set pipe_parallel_size: 0 (no pipeline) or stage: 1"
        )
    if derived.precision in ("fp16", "bfloat16") and stage == 0:
        raise ConfigError(
            f"{derived.precision} with zero_optimization.stage 0 is broken in DeepSpeed 0.19 "
            "(loss never scaled / spurious first step); use stage: 1, as GPT-NeoX does"
        )


def check_training(training: TrainingConfig, parallel: ParallelConfig) -> None:
    if training.partition_activations and parallel.model_parallel_size > 1 and not parallel.sequence_parallel:
        raise ConfigError(
            f"partition_activations: true is done here by sequence_parallel: true, which keeps the "
            f"checkpointed layer inputs split over the {parallel.model_parallel_size} tensor-parallel ranks; "
            "set sequence_parallel: true (or partition_activations: false)"
        )
    if training.compile_loss and parallel.model_parallel_size > 1:
        raise ConfigError(
            f"compile_loss needs model_parallel_size 1, got {parallel.model_parallel_size}: the "
            "vocabulary-parallel loss communicates inside its autograd function; set compile_loss: false"
        )


def check_launchable(cfg: "NeoXConfig") -> None:
    """Settings the planner accepts but a launch on this machine cannot use."""
    d = cfg.derived
    if d.launcher in ("pdsh", "mvapich") or (d.launcher == "openmpi" and d.num_nodes > 1):
        if not cfg.launcher.hostfile:
            raise ConfigError(f"num_nodes {d.num_nodes} with launcher {d.launcher} needs a hostfile listing the "
                              "nodes (or launcher: slurm, which needs none)")
        _require(cfg.launcher.hostfile, "hostfile")
    if d.world_size % d.num_nodes:
        raise ConfigError(f"world size {d.world_size} is not divisible by {d.num_nodes} nodes")


TEXT_GEN_TYPES = ("unconditional", "input-file", "interactive")


def check_generation(gen: GenerationConfig) -> None:
    """Generation keys, checked with the rest so deepy.py refuses them before launching."""
    if gen.text_gen_type is not None and gen.text_gen_type not in TEXT_GEN_TYPES:
        raise ConfigError(f"text_gen_type is {gen.text_gen_type!r}; choose one of {', '.join(map(repr, TEXT_GEN_TYPES))}")
    if gen.temperature < 0 or gen.top_k < 0 or not 0 <= gen.top_p <= 1:
        raise ConfigError(f"temperature {gen.temperature} and top_k {gen.top_k} must be >= 0 and top_p "
                          f"{gen.top_p} in [0, 1]")
    if gen.maximum_tokens < 1 or gen.num_samples < 1:
        raise ConfigError(f"maximum_tokens {gen.maximum_tokens} and num_samples {gen.num_samples} must be >= 1")
    if gen.text_gen_type == "input-file" and not gen.sample_input_file:
        raise ConfigError("text_gen_type 'input-file' needs sample_input_file (one prompt a line)")
    if not gen.prompt_end:
        raise ConfigError("prompt_end must not be empty (it separates the prompts of sample_input_file)")
