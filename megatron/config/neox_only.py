"""GPT-NeoX's keys for what this framework does differently or not at all: the one table of them.

A GPT-NeoX config must load unchanged, so every key of GPT-NeoX is known (the rest live in
schema.py and blocks.py). The keys here are of five kinds:

    OFF   a feature not implemented here: accepted at GPT-NeoX's default, refused when it asks for it
    HINT  a switch that changes nothing here (kernel fusion, profiling...); the doc says why
    RUN   written by GPT-NeoX itself while it runs, so saved GPT-NeoX configs carry it; ignored
    SAME  a second spelling GPT-NeoX derives from another key; when given, the two must agree
    DS    passed to DeepSpeed's JSON unchanged (DeepSpeed implements it)

Choices of known keys that GPT-NeoX has and this framework lacks (pos_emb: alibi, ...) are in
UNIMPLEMENTED_CHOICES below. `NeoXOnlyConfig` is built from the table, so docs/config.md lists
every key with its kind; `check_neox_only` refuses a config that asks for a missing feature.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Callable, Literal

from megatron.config.blocks import ATTENTION_TYPES, OPTIMIZER_TYPES
from megatron.config.errors import ConfigError

OFF, HINT, RUN, SAME, DS = "off", "hint", "run", "same", "ds"

_MOE, _TE, _MUP, _RL = ("mixture of experts", "NVIDIA Transformer Engine layers", "muP parametrisation",
                        "preference/RL training (DPO, KTO, reward models, REINFORCE)")
_NOP = "accepted; changes nothing here"
_DATA = "preference or label datasets"

# key: (type, GPT-NeoX's default, kind, text). OFF: text names the missing feature; SAME: the
# key it must agree with; HINT: what the key does here.
TABLE: dict[str, tuple[Any, Any, str, str]] = {
    # parallelism and runtime bookkeeping
    "world_size": (int | None, None, SAME, "the launched world size"),
    "global_num_gpus": (int | None, None, SAME, "the launched world size"),
    "is_pipe_parallel": (bool | None, None, SAME, "pipe_parallel_size >= 1"),
    "padded_vocab_size": (int | None, None, SAME, "the padded vocabulary"),
    "local_rank": (int | None, None, RUN, ""), "rank": (int | None, None, RUN, ""),
    "iteration": (int | None, None, RUN, ""), "do_train": (bool | None, None, RUN, ""),
    "do_valid": (bool | None, None, RUN, ""), "do_test": (bool | None, None, RUN, ""),
    "user_script": (str | None, None, RUN, ""), "config_files": (dict | None, None, RUN, ""),
    "git_hash": (str | None, None, RUN, ""), "comet_experiment": (Any, None, RUN, ""),
    "deepspeed": (bool, True, RUN, ""), "deepscale": (bool, False, RUN, ""),
    "deepscale_config": (str | None, None, RUN, ""),
    # model features
    "sliding_window_width": (int | None, None, OFF, "sliding-window attention"),
    "use_qk_layernorm": (bool, False, OFF, "query/key layernorm"),
    "opt_pos_emb_offset": (int, 0, OFF, "OPT's position-embedding offset"),
    "sparsity_config": (dict | None, None, OFF, "DeepSpeed sparse attention"),
    "num_unique_layers": (int | None, None, OFF, "weights shared between layers"),
    "gpt_j_tied": (bool, False, OFF, "GPT-J's shared layernorm of attention and MLP"),
    "soft_prompt_tuning": (dict | None, None, OFF, "soft prompt tuning"),
    "fp16_lm_cross_entropy": (bool, False, OFF, "a half-precision loss (the loss is fp32 here)"),
    "serve_model_weights": (bool, False, OFF, "the weight server of online RL"),
    "te_columnparallel": (bool, False, OFF, _TE), "te_rowparallel": (bool, False, OFF, _TE),
    "te_layernorm_mlp": (bool, False, OFF, _TE), "te_mha": (bool, False, OFF, _TE),
    "te_fp8_mha": (bool, False, OFF, "fp8 attention (Transformer Engine)"),
    "moe_num_experts": (int, 1, OFF, _MOE),
    "use_mup": (bool, False, OFF, _MUP), "coord_check": (bool, False, OFF, "muP coordinate checks"),
    "save_base_shapes": (bool, False, OFF, "muP base shapes"),
    "lazy_mpu_init": (bool, False, OFF, "lazy model-parallel initialisation"),
    # Not a key of GPT-NeoX HEAD, but its older Llama/Mistral configs carry it.
    "mlp_type": (str, "regular", OFF, "GPT-NeoX's former Llama MLP switch, since replaced by activation: swiglu, "
                                      "intermediate_size: 8 x hidden_size, mlp_multiple_of: 256"),
    # hints of model features
    "rmsnorm_fusion": (bool, False, HINT, "Accepted; PyTorch's fused RMSNorm is always used."),
    "use_flashattn_swiglu": (bool, False, HINT, "Accepted; the gated MLP runs in PyTorch."),
    "scaled_masked_softmax_fusion": (bool, False, HINT, "Accepted; attention always uses PyTorch's fused SDPA."),
    "bias_dropout_fusion": (bool, False, HINT, "Accepted; bias and dropout run as PyTorch ops."),
    "fused_kernels_build_path": (str | None, None, HINT, "Accepted; no kernels are built here."),
    "apply_query_key_layer_scaling": (bool, False, HINT, "Accepted; an fp16 overflow guard that leaves the "
                                                         "softmax unchanged, which SDPA computes stably."),
    "attention_softmax_in_fp32": (bool, False, HINT, "Accepted; SDPA accumulates the softmax in fp32."),
    "use_cpu_initialization": (bool, False, HINT, _NOP + " (weights are initialised where they live)."),
    "rotary_save_freqs_buffer": (bool, False, HINT, "Accepted; rotary frequencies are recomputed, not saved."),
    "scalenorm_epsilon": (float, 1e-8, HINT, "Only for norm 'scalenorm', which is refused."),
    "rpe_num_buckets": (int, 32, HINT, "Only for pos_emb 'rpe', which is refused."),
    "rpe_max_distance": (int, 128, HINT, "Only for pos_emb 'rpe', which is refused."),
    "param_sharing_style": (str, "grouped", HINT, "Only with num_unique_layers, which is refused."),
    "gmlp_attn_dim": (int, 64, HINT, "Only for attention_config 'gmlp', which is refused."),
    **{k: (t, d, HINT, "Only for Mamba layers (attention_config 'mamba'), which are refused.") for k, t, d in (
        ("mamba_selective_scan_fusion", bool, False), ("mamba_causal_conv_fusion", bool, False),
        ("mamba_inner_func_fusion", bool, False), ("mamba_selective_fp32_params", bool, True),
        ("mamba_use_bias_in_conv", bool, True), ("mamba_use_bias_in_linears", bool, False))},
    **{k: (int | None, None, HINT, "Only for RWKV layers (attention_config 'rwkv'), which are refused.")
       for k in ("dim_att", "head_size", "ffn_dim")},
    **{k: (t, d, HINT, "Only with Transformer Engine (te_*), which is refused.") for k, t, d in (
        ("te_fp8_format", Literal["e4m3", "hybrid"], "hybrid"), ("te_fp8_wgrad", bool, True),
        ("te_fp8_amax_history_len", int, 1), ("te_fp8_amax_compute_algo", str, "most_recent"),
        ("te_fp8_margin", int, 0))},
    **{k: (int | list | str, d, HINT, "Only with serve_model_weights, which is refused.") for k, d in (
        ("weight_server_port", 6000), ("online_dataserver_ips", "localhost"), ("online_dataserver_ports", 10000))},
    **{k: (t, d, HINT, "Only with moe_num_experts > 1, which is refused.") for k, t, d in (
        ("moe_expert_interval", int, 1), ("moe_top_k", int, 1),
        ("moe_router_type", Literal["sinkhorn", "topk"], "sinkhorn"), ("moe_lbl_in_fp32", bool, False),
        ("moe_jitter_eps", float | None, None))},
    **{k: (t, d, HINT, "Only with use_mup, which is refused.") for k, t, d in (
        ("base_shapes_file", str | None, None), ("mup_init_scale", float, 1.0), ("mup_attn_temp", float, 1.0),
        ("mup_output_temp", float, 1.0), ("mup_embedding_mult", float, 1.0),
        ("mup_rp_embedding_mult", float, 1.0), ("mup_width_scale", int, 2))},
    # optimizer
    "optimizer_type": (str | None, None, SAME, "optimizer.type"),
    "lr": (float | None, None, SAME, "optimizer.params.lr"),
    "zero_stage": (int | list | str | None, None, SAME, "zero_optimization.stage"),
    "zero_reduce_scatter": (bool | None, None, SAME, "zero_optimization.reduce_scatter"),
    "zero_contiguous_gradients": (bool | None, None, SAME, "zero_optimization.contiguous_gradients"),
    "zero_reduce_bucket_size": (int | None, None, SAME, "zero_optimization.reduce_bucket_size"),
    "zero_allgather_bucket_size": (int | None, None, SAME, "zero_optimization.allgather_bucket_size"),
    "clip_grad": (float | None, None, SAME, "gradient_clipping"),
    "use_bnb_optimizer": (bool, False, OFF, "bitsandbytes' 8-bit Adam"),
    **{k: (t, d, HINT, "GPT-NeoX does not read it either; the fp16 block decides.") for k, t, d in (
        ("hysteresis", int, 2), ("dynamic_loss_scale", bool | None, None), ("loss_scale", float | None, None),
        ("loss_scale_window", float, 1000.0), ("min_scale", float, 1.0))},
    # training and data
    "batch_size": (int | None, None, SAME, "train_micro_batch_size_per_gpu"),
    "gas": (int | None, None, SAME, "gradient_accumulation_steps"),
    "train_epochs": (int | None, None, OFF, "training by epochs (set train_iters or train_tokens)"),
    "train_impl": (Literal["normal", "dpo", "rm", "kto", "reinforce"], "normal", OFF, _RL),
    "dataset_impl": (Literal["gpt2", "pairwise", "online"], "gpt2", OFF, _DATA),
    "pack_impl": (Literal["packed", "pack_until_overflow", "unpacked"], "packed", OFF,
                  "sequences other than packed documents"),
    **{k: (list | None, None, OFF, _DATA) for k in (
        "train_label_data_paths", "valid_label_data_paths", "test_label_data_paths",
        "train_reward_data_paths", "valid_reward_data_paths", "test_reward_data_paths",
        *(f"{s}_{w}_{x}data_paths" for s in ("pos", "neg") for w in ("train", "valid", "test")
          for x in ("", "label_")))},
    **{k: (t, d, HINT, "Only with train_impl other than 'normal', which is refused.") for k, t, d in (
        ("dpo_fp32", bool, True), ("dpo_reference_free", bool, False), ("dpo_beta", float, 0.1),
        ("kto_fp32", bool, True), ("kto_desirable_weight", float, 1.0), ("kto_undesirable_weight", float, 1.0),
        ("kto_beta", float, 0.1), ("fp32_reinforce", bool, True), ("kl_div_beta", float, 0.1),
        ("kl_impl", Literal["abs", "mse", "kl", "full"], "mse"), ("reinforce_leave_one_out", bool, False),
        ("allow_chopped", bool, True))},
    "z_loss": (float, 0.0, OFF, "the z-loss on the logits"),
    "char_level_ppl": (bool, False, OFF, "character-level perplexity"),
    "short_seq_prob": (float, 0.1, HINT, "Accepted; unused, as in GPT-NeoX."),
    # Rank 0 builds the dataset index caches beside the data and every rank reads them: shared storage.
    "use_shared_fs": (bool, True, OFF, "dataset indexes built on each node's own storage"),
    "mmap_warmup": (bool, False, HINT, "Accepted; datasets are memory-mapped and paged in on demand."),
    "deepspeed_activation_checkpointing": (bool, True, HINT, "Accepted; checkpoint_activations decides."),
    "contiguous_checkpointing": (bool, False, OFF, "contiguous buffers for checkpointed activations"),
    "checkpoint_in_cpu": (bool, False, OFF, "checkpointed activations kept in CPU memory"),
    "s3_path": (str | None, None, OFF, "checkpoint upload to S3"),
    "s3_chunk_size": (int, 104857600, HINT, "Only with s3_path, which is refused."),
    "adlr_autoresume": (bool, False, OFF, "NVIDIA ADLR autoresume (preemption is handled by SIGTERM here)"),
    "adlr_autoresume_interval": (int, 1000, HINT, "Only with adlr_autoresume, which is refused."),
    "onnx_safe": (bool, False, HINT, _NOP + " (no ONNX export)."),
    "curriculum_learning": (dict | None, None, OFF, "curriculum learning"),
    "curriculum_seqlen": (int, 0, RUN, ""),
    # logging, profiling, evaluation
    "use_comet": (bool | None, None, OFF, "Comet logging"),
    **{k: (t, None, HINT, "Only with use_comet, which is refused.") for k, t in (
        ("comet_workspace", str | None), ("comet_project", str | None), ("comet_experiment_name", str | None),
        ("comet_tags", list | None), ("comet_others", dict | None))},
    "wandb_init_all_ranks": (bool, False, OFF, "a wandb run on every rank (rank 0 logs here)"),
    "peak_theoretical_tflops": (float | None, None, HINT, _NOP + " (no MFU is logged from it)."),
    "log_grad_norm": (bool, False, HINT, "Accepted; grad_norm is always logged."),
    "log_param_norm": (bool, False, OFF, "parameter-norm logging"),
    "log_grad_pct_zeros": (bool, False, OFF, "logging the fraction of zero gradients"),
    "log_optimizer_states": (bool, False, OFF, "optimizer-state logging"),
    "log_gradient_noise_scale": (bool, False, OFF, "the gradient noise scale"),
    "gradient_noise_scale_n_batches": (int, 5, HINT, "Only with log_gradient_noise_scale, which is refused."),
    "gradient_noise_scale_cpu_offload": (bool, False, HINT, "Only with log_gradient_noise_scale, which is refused."),
    "memory_profiling": (bool, False, OFF, "CUDA memory profiling"),
    "memory_profiling_path": (str | None, None, HINT, "Only with memory_profiling, which is refused."),
    "profile": (bool, False, OFF, "the PyTorch/NVTX profiler"),
    "profile_step_start": (int, 10, HINT, "Only with profile, which is refused."),
    "profile_step_stop": (int, 12, HINT, "Only with profile, which is refused."),
    "profile_backward": (bool, False, HINT, _NOP + " (NVTX ranges of the backward pass)."),
    "precompute_model_name": (str | None, None, OFF, "precomputed logits for distillation"),
    "return_logits": (bool, False, OFF, "returning logits from generation"),
    # DeepSpeed blocks and runner
    "scheduler": (dict | None, None, OFF, "DeepSpeed's scheduler block (lr_decay_style sets the schedule)"),
    "amp": (dict | None, None, OFF, "apex AMP (use fp16/bf16)"),
    "sparse_gradients": (bool, False, OFF, "sparse embedding gradients"),
    "autotuning": (dict | None, None, OFF, "DeepSpeed autotuning"),
    "autotuning_run": (str | None, None, OFF, "DeepSpeed autotuning"),
    "activation_checkpointing": (dict | None, None, OFF,
                                 "a raw DeepSpeed activation_checkpointing block (use checkpoint_activations, "
                                 "partition_activations)"),
    "sparse_attention": (dict | None, None, OFF, "DeepSpeed sparse attention"),
    "data_efficiency": (dict | None, None, OFF, "DeepSpeed data efficiency"),
    "elasticity": (dict | None, None, OFF, "DeepSpeed elastic training"),
    "compression_training": (dict | None, None, OFF, "DeepSpeed compression"),
    "checkpoint": (dict | None, None, OFF, "a raw DeepSpeed checkpoint block"),
    "force_multi": (bool, False, HINT, "Accepted; num_nodes and the launcher decide how ranks start."),
    **{k: (t, d, DS, "Passed to DeepSpeed's JSON as is.") for k, t, d in (
        ("prescale_gradients", bool, False), ("gradient_predivide_factor", float, 1.0), ("dump_state", bool, False),
        ("flops_profiler", dict | None, None), ("comms_logger", dict | None, None),
        ("tensorboard", dict | None, None), ("wandb", dict | None, None), ("csv_monitor", dict | None, None),
        ("data_types", dict | None, None), ("communication_data_type", str | None, None))},
    "deepspeed_extra_args": (dict | None, None, DS, "Merged into DeepSpeed's JSON (GPT-NeoX's escape hatch)."),
}

# Choices of schema keys that GPT-NeoX offers and this framework does not implement.
UNIMPLEMENTED_CHOICES: dict[tuple[str, str], dict[str, str]] = {
    ("model", "norm"): {"non_parametric_layernorm": "a layernorm without weights", "scalenorm": "ScaleNorm",
                        "te_rmsnorm": _TE, "te_layernorm": _TE},
    ("model", "pos_emb"): {"sinusoidal": "sinusoidal position embeddings", "rpe": "T5 relative position buckets",
                           "alibi": "ALiBi attention biases"},
    **{("model", key): {m: f"the {m} initialisation" for m in (
        "orthogonal", "scaled_orthogonal", "xavier_uniform", "xavier_normal", "single_residual_scaled_normal")}
       for key in ("init_method", "output_layer_init_method")},
    ("lr", "lr_decay_style"): {"exponential": "an exponential learning-rate decay"},
    ("data", "tokenizer_type"): {"HFGPT2Tokenizer": "the GPT-2 tokenizer from the Hugging Face hub (use "
                                                    "GPT2BPETokenizer with vocab_file and merge_file)",
                                 "TiktokenTokenizer": "tiktoken"},
    ("data", "data_impl"): {"cached": "the cached dataset format"},
}
# GPT-NeoX's optimizer types (compared in lower case, as GPT-NeoX does) beyond Adam/AdamW/SGD.
UNIMPLEMENTED_OPTIMIZERS = {"lion": "the Lion optimizer", "onebitadam": "1-bit Adam", "cpu_adam": "DeepSpeed's CPU Adam",
                            "cpu_torch_adam": "Adam stepped on the CPU", "sm3": "the SM3 optimizer",
                            "madgrad_wd": "the MADGRAD optimizer"}


def _show(value: Any) -> str:
    """A value as YAML writes it, shortened: the error stays one line."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _doc(kind: str, default: Any, text: str) -> str:
    if kind == OFF:
        return f"Not implemented here ({text}): accepted at {_show(default)}, refused otherwise."
    if kind == RUN:
        return "Written by GPT-NeoX while it runs (saved GPT-NeoX configs carry it); ignored here."
    if kind == SAME:
        return f"GPT-NeoX's second spelling of {text}; when set, it must agree with it."
    return text


NeoXOnlyConfig = dataclasses.make_dataclass(
    "NeoXOnlyConfig",
    [(key, typ, dataclasses.field(default=default, metadata={"doc": _doc(kind, default, text), "kind": kind}))
     for key, (typ, default, kind, text) in TABLE.items()],
    frozen=True,
)
NeoXOnlyConfig.__doc__ = "GPT-NeoX's keys for features absent here, hints and second spellings (see TABLE)."


def refusal(key: str, value: Any, feature: str, fix: str) -> ConfigError:
    return ConfigError(f"{key}: {_show(value)} asks for {feature}, which this framework does not implement ({fix})")


def _choices(allowed: tuple[str, ...]) -> str:
    return ", ".join(map(repr, allowed[:-1])) + f" or {allowed[-1]!r}"


def canonical_optimizer(type_: str) -> str:
    """optimizer.type in this framework's spelling; GPT-NeoX compares it in lower case."""
    by_lower = {t.lower(): t for t in OPTIMIZER_TYPES}
    if type_.lower() in by_lower:
        return by_lower[type_.lower()]
    if type_.lower() in UNIMPLEMENTED_OPTIMIZERS:
        raise refusal("optimizer.type", type_, UNIMPLEMENTED_OPTIMIZERS[type_.lower()],
                      "choose Adam, AdamW or SGD")
    raise ConfigError(f"optimizer.type is {type_!r}; choose one of {', '.join(OPTIMIZER_TYPES)}")


def check_neox_only(groups: dict[str, Any]) -> None:
    """Refuse, before launch, a config that asks for a GPT-NeoX feature this framework lacks."""
    neox = groups["neox"]
    for key, (_, default, kind, feature) in TABLE.items():
        value = getattr(neox, key)
        if kind == OFF and value != default:
            fix = "remove it" if default is None else f"leave it at {_show(default)}"
            raise refusal(key, value, feature, fix)
    for (group, key), missing in UNIMPLEMENTED_CHOICES.items():
        value = getattr(groups[group], key)
        if value in missing:
            hint = _implemented_choices(groups[group], key, missing)
            raise refusal(key, value, missing[value], f"choose {hint}")
    for entry in groups["model"].attention_config or []:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)):
            raise ConfigError(f"attention_config entry {_show(entry)} is not [[types...], layers]")
        for kind in entry[0]:
            if kind not in ATTENTION_TYPES:
                raise refusal("attention_config", kind, f"{kind} attention layers", "use 'global' or 'flash'")


def _implemented_choices(block: Any, key: str, missing: dict[str, str]) -> str:
    """The implemented choices of a Literal-typed key, for the refusal's hint."""
    hint = typing.get_type_hints(type(block))[key]
    return _choices(tuple(v for v in typing.get_args(hint) if v not in missing))


# SAME keys: the value GPT-NeoX derives each from, given the groups and the Derived values.
_PRIMARY: dict[str, Callable[[dict[str, Any], Any], Any]] = {
    "world_size": lambda g, d: d.world_size,
    "global_num_gpus": lambda g, d: d.world_size,
    "is_pipe_parallel": lambda g, d: d.pipelined,
    "padded_vocab_size": lambda g, d: d.padded_vocab_size,
    "optimizer_type": lambda g, d: g["optimizer"].optimizer.type,
    "lr": lambda g, d: g["optimizer"].optimizer.params.lr,
    "zero_stage": lambda g, d: g["optimizer"].zero_optimization.stage,
    "zero_reduce_scatter": lambda g, d: g["optimizer"].zero_optimization.reduce_scatter,
    "zero_contiguous_gradients": lambda g, d: g["optimizer"].zero_optimization.contiguous_gradients,
    "zero_reduce_bucket_size": lambda g, d: g["optimizer"].zero_optimization.reduce_bucket_size,
    "zero_allgather_bucket_size": lambda g, d: g["optimizer"].zero_optimization.allgather_bucket_size,
    "clip_grad": lambda g, d: g["optimizer"].gradient_clipping,
    "batch_size": lambda g, d: d.micro_batch_size,
    "gas": lambda g, d: d.gradient_accumulation_steps,
}


def check_second_spellings(groups: dict[str, Any], derived: Any) -> None:
    """GPT-NeoX overwrites these keys from their primary key, so a value that disagrees would be
    silently dropped there; here it is an error naming both."""
    neox = groups["neox"]
    for key, primary in _PRIMARY.items():
        value, expected = getattr(neox, key), primary(groups, derived)
        if key == "optimizer_type" and value is not None:
            value = canonical_optimizer(value)
        if value is not None and expected is not None and value != expected:
            raise ConfigError(f"{key} is {_show(value)} but {TABLE[key][3]} is {_show(expected)}; GPT-NeoX derives "
                              f"{key} from it: remove {key} or make them agree")
