"""Checks that run before anything launches. Each error names the keys and numbers that disagree."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.config.errors import ConfigError
from megatron.config.neox_only import canonical_optimizer
from megatron.config.schema import (DataConfig, EvaluationConfig, GenerationConfig, LRConfig, ModelConfig,
                                    OptimizerConfig, ParallelConfig, TrainingConfig)
from megatron.model.layer_types import expand_attention_config

if TYPE_CHECKING:
    from megatron.config.config import Derived, NeoXConfig

def check_optimizer(groups: dict[str, Any]) -> dict[str, Any]:
    """The groups with optimizer.type in this framework's spelling (GPT-NeoX accepts any case)."""
    opt: OptimizerConfig = groups["optimizer"]
    spec = opt.optimizer
    kind = canonical_optimizer(spec.type)
    if kind != "SGD" and spec.params.momentum:
        raise ConfigError("optimizer.params.momentum only applies to SGD")
    return {**groups, "optimizer": dataclasses.replace(opt, optimizer=dataclasses.replace(spec, type=kind))}


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
    if data.tokenizer_type in ("HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer"):
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
    kv = model.num_kv_heads
    if kv is not None and (heads % kv or kv % tp):
        raise ConfigError(f"num_kv_heads {kv} must divide num_attention_heads {heads} and be divisible by "
                          f"model_parallel_size {tp}")
    try:
        expand_attention_config(model.attention_config, model.num_layers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
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
    zero = opt.zero_optimization
    if zero.cpu_offload and zero.offload_optimizer is not None:
        raise ConfigError("zero_optimization sets both cpu_offload and offload_optimizer; keep one "
                          "(cpu_offload: true is offload_optimizer: {device: cpu})")


def check_training(training: TrainingConfig, parallel: ParallelConfig, lr: LRConfig) -> None:
    tp = parallel.model_parallel_size
    if training.partition_activations and tp > 1 and parallel.pipe_parallel_size == 0 and not parallel.sequence_parallel:
        # DeepSpeed's partitioned checkpoint is wired into the pipeline engine's layers only.
        raise ConfigError(
            f"partition_activations with model_parallel_size {tp} needs the pipeline engine "
            "(pipe_parallel_size >= 1) or sequence_parallel: true; with pipe_parallel_size 0 it is not "
            "implemented")
    if lr.override_lr_scheduler and lr.use_checkpoint_lr_scheduler:
        raise ConfigError("override_lr_scheduler and use_checkpoint_lr_scheduler are both true: the schedule "
                          "comes either from this config or from the checkpoint; set one")
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


def check_generation(gen: GenerationConfig) -> None:
    """Generation keys, checked with the rest so deepy.py refuses them before launching."""
    if gen.temperature < 0 or gen.top_k < 0 or not 0 <= gen.top_p <= 1:
        raise ConfigError(f"temperature {gen.temperature} and top_k {gen.top_k} must be >= 0 and top_p "
                          f"{gen.top_p} in [0, 1]")
    if gen.maximum_tokens < 1 or gen.num_samples < 1:
        raise ConfigError(f"maximum_tokens {gen.maximum_tokens} and num_samples {gen.num_samples} must be >= 1")
    if gen.text_gen_type == "input-file" and not gen.sample_input_file:
        raise ConfigError("text_gen_type 'input-file' needs sample_input_file (one prompt a line)")
    if not gen.prompt_end:
        raise ConfigError("prompt_end must not be empty (it separates the prompts of sample_input_file)")


def check_evaluation(ev: EvaluationConfig) -> None:
    """Task names and sizes, so deepy.py refuses them before launching (the documents are checked
    by the worker, which reads them)."""
    from megatron.evaluation.sources import TASKS  # the task table; lm_eval itself is not imported

    for task in ev.eval_tasks or []:
        if task not in TASKS:
            near = difflib.get_close_matches(task, list(TASKS), n=2)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise ConfigError(f"eval_tasks: unknown task {task!r}; {hint}known: {', '.join(TASKS)}")
    for key in ("eval_tasks_limit", "eval_tasks_batch_size"):
        if getattr(ev, key) is not None and getattr(ev, key) < 1:
            raise ConfigError(f"{key} is {getattr(ev, key)}; it must be at least 1 (or unset)")
