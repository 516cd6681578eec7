"""The run's configuration: loaded, merged, derived and validated once, then never changed.

`load_config` is the only way to build a `NeoXConfig`. Derived values (data-parallel size, the
batch triple, the padded vocabulary, warmup iterations...) live in `NeoXConfig.derived`, computed
in one place, so no other module recomputes them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.config.errors import ConfigError
from megatron.config.loader import Override, merge_files, split_into_groups
from megatron.config.neox_only import NeoXOnlyConfig, check_neox_only, check_second_spellings
from megatron.config.schema import (
    CheckpointConfig,
    DataConfig,
    EvaluationConfig,
    GenerationConfig,
    LauncherConfig,
    LoggingConfig,
    LRConfig,
    ModelConfig,
    OptimizerConfig,
    GATED_ACTIVATIONS,
    ParallelConfig,
    TrainingConfig,
)
from megatron.config.validate import (check_evaluation, check_files, check_generation, check_model, check_optimizer,
                                      check_precision, check_training)
from megatron.tokenizer.tokenizer import pad_vocab_size


@dataclass(frozen=True)
class Derived:
    world_size: int
    data_parallel_size: int
    train_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    train_iters: int
    lr_decay_iters: int
    warmup_iters: int
    intermediate_size: int  # width of the MLP's activation output (dense_4h_to_h's input)
    num_kv_heads: int
    pipe_stages: int  # pipeline stages; 1 when pipe_parallel_size is 0
    pipelined: bool  # DeepSpeed's pipeline engine runs (pipe_parallel_size >= 1), as in GPT-NeoX
    max_position_embeddings: int
    vocab_size: int | None
    padded_vocab_size: int | None
    precision: str
    zero_stage: int  # ZeRO stage run: zero_optimization.stage, except fp16/bf16 at stage 0 runs stage 1
    lr: float
    save_iters: tuple[int, ...]  # iterations that save: multiples of checkpoint_factor and extra_save_iters
    launcher: str  # how deepy.py starts the ranks: local, pdsh, slurm, openmpi or mvapich
    num_nodes: int
    procs_per_node: int


@dataclass(frozen=True)
class NeoXConfig:
    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    lr: LRConfig
    data: DataConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    launcher: LauncherConfig
    generation: GenerationConfig
    evaluation: EvaluationConfig
    neox: NeoXOnlyConfig  # type: ignore[valid-type]  # built from neox_only.TABLE
    derived: Derived
    config_files: tuple[str, ...]
    overrides: tuple[Override, ...]

    def to_dict(self) -> dict[str, Any]:
        """Flat GPT-NeoX-style dict of every key (for wandb and the saved run config)."""
        flat: dict[str, Any] = {}
        for group in ("model", "parallel", "optimizer", "lr", "data", "training",
                      "checkpoint", "logging", "launcher", "generation", "evaluation", "neox"):
            flat.update(dataclasses.asdict(getattr(self, group)))
        flat.update({f"derived.{k}": v for k, v in dataclasses.asdict(self.derived).items()})
        return flat


def effective_launcher(launcher: LauncherConfig) -> str:
    """GPT-NeoX's switches folded into one name: deepspeed_slurm means Slurm, deepspeed_mpi MPI;
    one node without either is started here directly."""
    if launcher.deepspeed_slurm or launcher.launcher == "slurm":
        return "slurm"
    if launcher.deepspeed_mpi or launcher.launcher in ("openmpi", "mvapich"):
        return "mvapich" if launcher.launcher == "mvapich" else "openmpi"
    return "pdsh" if launcher.num_nodes > 1 else "local"


def pipe_stages(parallel: ParallelConfig) -> int:
    """Pipeline stages: pipe_parallel_size, where 0 (the plain engine) is one stage. Before the
    world size is known (planning the launch) this is the only place that says so; afterwards
    it is `Derived.pipe_stages`."""
    return max(parallel.pipe_parallel_size, 1)


def mlp_width(model: ModelConfig) -> int:
    """GPT-NeoX's MLP sizing: the size is intermediate_size, else expansion_factor x hidden, else
    4 x hidden; a gated activation keeps two thirds of it for both halves together; the width
    (of one half when gated) is rounded up to mlp_multiple_of."""
    h = model.hidden_size
    size = model.intermediate_size or (int(model.expansion_factor * h) if model.expansion_factor else 4 * h)
    if model.activation in GATED_ACTIVATIONS:
        size = int(size * 2 / 3) // 2
    m = model.mlp_multiple_of
    return m * -(-size // m)


def save_iterations(ck: CheckpointConfig, train_iters: int) -> tuple[int, ...]:
    """GPT-NeoX's `save_iters`: with checkpoint_scale linear every multiple of checkpoint_factor,
    with log every power of it (1, f, f^2, ... below train_iters), plus extra_save_iters; the last
    iteration also saves, which the training loop handles."""
    iters = {i for i in (ck.extra_save_iters or []) if 0 < i <= train_iters}
    factor = ck.checkpoint_factor
    if factor and ck.checkpoint_scale == "linear":
        if factor != int(factor) or factor < 1:
            raise ConfigError(f"checkpoint_factor {factor} must be a whole number >= 1 with checkpoint_scale linear")
        iters.update(range(int(factor), train_iters + 1, int(factor)))
    elif factor:
        if factor <= 1:
            raise ConfigError(f"checkpoint_factor {factor} must be > 1 with checkpoint_scale log")
        power = 1.0
        while power < train_iters:
            iters.add(int(power))
            power *= factor
    return tuple(sorted(iters))


def _zero_stage(stage: int, precision: str) -> int:
    """DeepSpeed 0.19's mixed precision at ZeRO stage 0 never scales the fp16 loss and takes a
    zero-gradient step at start, so it runs at stage 1: the same updates, with the optimizer state
    split over the data-parallel ranks (GPT-NeoX's Pythia 14M/31M configs ask for stage 0)."""
    return 1 if stage == 0 and precision in ("fp16", "bfloat16") else stage


def _batch_triple(training: TrainingConfig, dp: int) -> tuple[int, int, int]:
    """Any two of (global, micro, grad-accum) give the third; all three must agree."""
    train, micro, gas = (training.train_batch_size, training.train_micro_batch_size_per_gpu,
                         training.gradient_accumulation_steps)
    if micro is not None and gas is not None:
        if train is not None and train != micro * gas * dp:
            raise ConfigError(
                f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x "
                f"gradient_accumulation_steps {gas} x data-parallel size {dp} (= {micro * gas * dp})"
            )
        return micro * gas * dp, micro, gas
    if train is not None:
        if micro is None and gas is None:
            gas = 1
        known = micro if micro is not None else gas
        if train % (known * dp):
            what = "train_micro_batch_size_per_gpu" if micro is not None else "gradient_accumulation_steps"
            raise ConfigError(
                f"train_batch_size {train} is not divisible by {what} {known} x data-parallel size {dp}"
            )
        other = train // (known * dp)
        return (train, known, other) if micro is not None else (train, other, known)
    if micro is not None:
        return micro * dp, micro, 1
    raise ConfigError(
        "set two of train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps"
    )


def _precision(opt: OptimizerConfig) -> str:
    """GPT-NeoX's rule: an enabled fp16/bf16 block sets precision, and precision 'fp16' or
    'bfloat16' alone turns its block on; the two must not contradict each other."""
    fp16_on = opt.fp16.enabled or bool(opt.fp16.fp16)
    if opt.fp16.type == "bfloat16":
        fp16_on, bf16_on = False, True
    else:
        bf16_on = opt.bf16.enabled
    if fp16_on and bf16_on:
        raise ConfigError("fp16 and bf16 are both enabled: choose one")
    derived = "fp16" if fp16_on else "bfloat16" if bf16_on else None
    if opt.precision is None or derived is None or derived == opt.precision:
        return opt.precision or derived or "fp32"
    raise ConfigError(f"precision {opt.precision!r} disagrees with the fp16/bf16 blocks ({derived or 'fp32'!r})")


def _untrained_defaults(training: TrainingConfig) -> TrainingConfig:
    t = training
    if t.train_batch_size is None and t.train_micro_batch_size_per_gpu is None and t.gradient_accumulation_steps is None:
        t = dataclasses.replace(t, train_micro_batch_size_per_gpu=1)
    if t.train_iters is None and t.train_tokens is None:
        t = dataclasses.replace(t, train_iters=1)
    return t


def derive(groups: dict[str, Any], world_size: int, vocab_size: int | None, num_nodes: int) -> Derived:
    model: ModelConfig = groups["model"]
    parallel: ParallelConfig = groups["parallel"]
    training: TrainingConfig = groups["training"]
    lr: LRConfig = groups["lr"]
    tp, pp = parallel.model_parallel_size, pipe_stages(parallel)
    if tp < 1 or parallel.pipe_parallel_size < 0:
        raise ConfigError(f"model_parallel_size must be >= 1 and pipe_parallel_size >= 0 (got {tp}, {parallel.pipe_parallel_size})")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by model_parallel_size {tp} x "
            f"pipe_parallel_size {pp} = {tp * pp}"
        )
    dp = world_size // (tp * pp)
    train, micro, gas = _batch_triple(training, dp)
    tokens_per_iter = train * model.seq_length
    if training.train_iters is not None:
        train_iters = training.train_iters
    elif training.train_tokens is not None:
        train_iters = math.ceil(training.train_tokens / tokens_per_iter)
    else:
        raise ConfigError("set train_iters or train_tokens")
    if train_iters < 1:
        raise ConfigError(f"train_iters must be >= 1, got {train_iters}")
    if lr.lr_decay_iters is not None and lr.lr_decay_fraction is not None:
        raise ConfigError("set lr_decay_iters or lr_decay_fraction, not both")
    if lr.lr_decay_fraction is not None:
        decay = int(train_iters * lr.lr_decay_fraction)
    else:
        decay = lr.lr_decay_iters or train_iters
    vocab = model.vocab_size if model.vocab_size is not None else vocab_size
    padded = None if vocab is None else pad_vocab_size(vocab, model.make_vocab_size_divisible_by, tp)
    opt: OptimizerConfig = groups["optimizer"]
    precision = _precision(opt)
    return Derived(
        world_size=world_size,
        data_parallel_size=dp,
        train_batch_size=train,
        micro_batch_size=micro,
        gradient_accumulation_steps=gas,
        train_iters=train_iters,
        lr_decay_iters=decay,
        warmup_iters=int(lr.warmup * decay),
        intermediate_size=mlp_width(model),
        num_kv_heads=model.num_kv_heads or model.num_attention_heads,
        pipe_stages=pp,
        pipelined=parallel.pipe_parallel_size >= 1,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        vocab_size=vocab,
        padded_vocab_size=padded,
        precision=precision,
        zero_stage=_zero_stage(opt.zero_optimization.stage, precision),
        lr=opt.optimizer.params.lr,
        save_iters=save_iterations(groups["checkpoint"], train_iters),
        launcher=effective_launcher(groups["launcher"]),
        num_nodes=num_nodes,
        procs_per_node=world_size // num_nodes,
    )


def load_config(
    paths: list[str],
    world_size: int | None = None,
    num_nodes: int | None = None,
    require_files: bool = True,
    vocab_size: int | None = None,
    cli: dict[str, Any] | None = None,
    training: bool = True,
) -> NeoXConfig:
    """Merge YAML files, derive, validate.

    world_size, num_nodes: the run's processes and nodes, from the caller that knows them (deepy.py
    asks the launcher, megatron/launcher/environment.py `node_layout`; a worker reads its launch
    environment). The config never looks at the machine. Unset: what the config alone asks for,
    num_nodes x (num_gpus, else model_parallel_size x pipe stages), for tools that only plan.
    require_files: check that data and tokenizer files exist (False for planning, e.g. --dry-run).
    vocab_size: the tokenizer's size when the caller has already loaded it.
    cli: keys given on the command line (deepy.py's --eval_tasks); they override the files.
    training: False for scripts that do not train (eval.py, generate.py): a config without batch
    keys then has a micro-batch of 1, and one without train_iters or train_tokens 1 iteration.
    """
    values, origin, overrides = merge_files(paths, cli)
    groups = check_optimizer(split_into_groups(values, origin))
    check_neox_only(groups)
    if not training:
        groups["training"] = _untrained_defaults(groups["training"])
    if require_files:
        check_files(groups["data"])
    nodes = num_nodes or groups["launcher"].num_nodes
    if world_size is None:
        parallel = groups["parallel"]
        world_size = nodes * (groups["launcher"].num_gpus
                              or parallel.model_parallel_size * pipe_stages(parallel))
    derived = derive(groups, world_size, vocab_size, nodes)
    check_second_spellings(groups, derived)
    check_model(groups["model"], groups["parallel"], derived)
    check_precision(groups["optimizer"], groups["parallel"], derived)
    check_training(groups["training"], groups["parallel"], groups["lr"])
    check_generation(groups["generation"])
    check_evaluation(groups["evaluation"])
    return NeoXConfig(
        **groups, derived=derived,
        config_files=tuple(str(Path(p)) for p in paths), overrides=tuple(overrides),
    )
