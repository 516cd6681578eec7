"""Everything a worker builds before its first step, in order: process group, seeds, tokenizer,
final config, datasets, engine, metrics logger."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from megatron.checkpointing.loading import LoadPlan
from megatron.config import ConfigError, NeoXConfig, load_config
from megatron.config.schema import GATED_ACTIVATIONS
from megatron.config.validate import check_launchable
from megatron.data.datasets import build_datasets, build_streaming_datasets
from megatron.launcher.environment import adopt_scheduler_environment, node_layout, world_size
from megatron.launcher.launch import free_port
from megatron.logging import MetricsLogger
from megatron.parallel.device import (allow_fp16_on_cpu, default_backend, device_type, keep_freed_host_memory,
                                      local_device)
from megatron.parallel.groups import ParallelGroups
from megatron.parallel.random import seed_tp_rng
from megatron.tokenizer import AbstractTokenizer, build_tokenizer
from megatron.training.engine import Stepper, build_engine
from megatron.training.flops import device_peak_flops, flops_per_token
from megatron.training.lr_schedule import AnnealingLR

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bfloat16": torch.bfloat16}


def init_distributed(cfg: NeoXConfig) -> None:
    """Join the process group the launcher set up (ours, DeepSpeed's, srun or mpirun); a bare
    `python train.py` becomes a world of 1. A collective waits distributed_timeout_minutes for a
    rank that died or hangs, then fails."""
    if dist.is_initialized():
        return
    adopt_scheduler_environment(cfg.launcher.master_port)
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    timeout = timedelta(minutes=cfg.launcher.distributed_timeout_minutes)
    # torch gives every later new_group its own 30-minute default, not the world group's timeout,
    # and DeepSpeed's pipeline grid creates groups we cannot pass a timeout to: the default is
    # what has to change for a hung rank to be noticed in time.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=default_backend(cfg.training.distributed_backend), timeout=timeout)
    if device_type() == "cpu":
        _unlink_deepspeed_shm_buffer()


# What gloo and NCCL say when a peer died or never answered; they raise plain RuntimeErrors.
_LOST_RANK = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe",
              "NCCL communicator was aborted", "remote process exited")


def lost_another_rank(err: BaseException) -> bool:
    """Whether a collective failed because another rank died or stopped responding."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(
        s in str(err) for s in _LOST_RANK))


def shutdown_distributed() -> None:
    """Leave the process group at a barrier: without it about a third of gloo runs aborted at
    exit ("terminate called without an active exception") after finishing their work."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _unlink_deepspeed_shm_buffer() -> None:
    """Remove the name of the 66 MiB shared-memory file DeepSpeed's CPU backend creates per rank.

    DeepSpeed opens every rank's /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    during init_distributed (for an inference all-reduce we never call) and never unlinks it, so
    each run leaves them behind (gigabytes after a test suite). Once every rank has opened all
    of them (the barrier), each rank unlinks its own: the mappings stay valid and the kernel
    frees the memory when the last process exits, crashed or not."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def config_tokenizer(cfg: NeoXConfig) -> AbstractTokenizer:
    """The tokenizer the config names, checked against a vocab_size the config states."""
    try:
        tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tok.vocab_size:
        raise ConfigError(
            f"vocab_size {cfg.model.vocab_size} in the config but the tokenizer "
            f"({cfg.data.vocab_file or cfg.data.tokenizer_type}) has {tok.vocab_size} entries"
        )
    return tok


def load_for_inference(module: torch.nn.Module, cfg: NeoXConfig, groups: ParallelGroups, doing: str) -> torch.nn.Module:
    """`load`'s weights in `module` (any stored layout), or the seeded initial ones with a warning
    as GPT-NeoX does; cast to the run's precision on GPUs, fp32 on the CPU; in eval mode. Rank 0
    says which; `doing` completes "... from the initial weights" ("generating", "evaluating")."""
    from megatron.checkpointing.loading import load_model_weights  # only runs with `load` need the readers

    rank0 = dist.get_rank() == 0
    if cfg.checkpoint.load:
        iteration = load_model_weights(module, cfg.checkpoint.load, cfg, groups.tensor)
        if rank0:
            print(f"loaded the weights of iteration {iteration} from {cfg.checkpoint.load}", flush=True)
    elif rank0:
        print(f"warning: `load` is not set: {doing} from the initial weights of seed {cfg.training.seed}", flush=True)
    device = next(module.parameters()).device
    dtype = DTYPES[cfg.derived.precision] if device.type == "cuda" else torch.float32
    return module.to(dtype).eval()


def worker_config(paths: list[str], cli: dict[str, Any] | None = None,
                  training: bool = True) -> tuple[NeoXConfig, AbstractTokenizer]:
    """The config as this process sees it: world size from the launcher, vocab from the tokenizer.
    cli: the keys deepy.py was given on its command line (megatron/launcher/cli.py). A worker that
    does not train reads no data files (load_config's `training`)."""
    layout = dict(world_size=world_size(), num_nodes=node_layout(paths)[0], require_files=training, cli=cli,
                  training=training)
    tok = config_tokenizer(load_config(paths, **layout))
    cfg = load_config(paths, vocab_size=tok.vocab_size, **layout)
    check_launchable(cfg)
    return cfg, tok


@dataclass
class RunState:
    cfg: NeoXConfig
    stepper: Stepper
    scheduler: AnnealingLR
    train: Any  # GPTDataset, BlendedDataset or StreamingDataset
    valid: Any
    test: Any  # evaluated once, when training reaches train_iters
    logger: MetricsLogger
    dp_rank: int
    flops_per_token: int
    peak_flops: float
    load_plan: LoadPlan | None  # what `load` holds and how it is loaded
    mask_token: int | None  # eod_mask_loss: positions whose input is this token are left out of the loss
    tasks: Any = None  # eval_tasks: megatron.evaluation.run.TaskEvaluator, called every eval_interval

    def print(self, text: str) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(text, flush=True)

    def summary(self) -> str:
        c = self.cfg
        lines = ["training finished"]
        for label, path in (("metrics", c.logging.log_dir and os.path.join(c.logging.log_dir, "metrics.jsonl")),
                            ("tensorboard", c.logging.tensorboard_dir), ("checkpoints", c.checkpoint.save)):
            if path:
                lines.append(f"  {label:12s} {os.path.abspath(path)}")
        return "\n".join(lines)


def build_data(cfg: NeoXConfig) -> tuple[Any, Any, Any]:
    """Train, validation and test datasets: preprocessed (blended or split) or streamed from raw files."""
    d, data = cfg.derived, cfg.data
    if data.data_impl == "stream":
        return build_streaming_datasets(
            data.train_data_paths, data.valid_data_paths, data.test_data_paths,
            (data.tokenizer_type, data.vocab_file, data.merge_file), cfg.model.seq_length,
            cfg.training.seed, data.num_workers, data.stream_text_key, data.stream_shuffle_files,
            data.stream_cache_dir)
    # Every evaluation, validation or test, reads the same first eval_iters batches of its split.
    eval_samples = cfg.training.eval_iters * d.train_batch_size
    samples = (d.train_iters * d.train_batch_size, eval_samples, eval_samples)
    try:
        train, valid, test = build_datasets(
            data.data_path, data.train_data_paths, data.valid_data_paths, data.test_data_paths,
            data.train_data_weights, data.valid_data_weights, data.test_data_weights,
            data.split, samples, cfg.model.seq_length, cfg.training.seed, vocab_size=d.vocab_size,
            weights_alpha=data.weighted_sampler_alpha if data.weight_by_num_documents else None)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if train is None:
        raise ConfigError(f"split {data.split!r} leaves no training documents in {data.data_path}")
    return train, valid, test


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def refuse_unsaveable(cfg: NeoXConfig) -> None:
    """Refuse, before any work, a run whose checkpoints could not be resumed at all."""
    if cfg.checkpoint.no_save_optim and cfg.checkpoint.save and cfg.derived.zero_stage == 3:
        raise ConfigError("no_save_optim with ZeRO stage 3 would save no weights (ZeRO 3 keeps them only in its "
                          "optimizer shards); use ZeRO stage 1 or 2, or drop no_save_optim")


def build_run(cfg: NeoXConfig) -> RunState:
    refuse_unsaveable(cfg)
    init_distributed(cfg)
    device = local_device()
    if device.type == "cpu":  # activations live in host memory only on the CPU
        keep_freed_host_memory()
        allow_fp16_on_cpu()
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.training.seed)
    d = cfg.derived
    train, valid, test = build_data(cfg)
    par = cfg.parallel
    groups = ParallelGroups(d.pipe_stages, par.model_parallel_size, d.data_parallel_size,
                            par.sequence_parallel)
    seed_tp_rng(cfg.training.seed, groups.tp_rank)
    stepper, scheduler, load_plan = build_engine(cfg, groups)
    dp_rank = groups.dp_rank
    lg = cfg.logging
    logger = MetricsLogger(
        lg.log_dir, lg.tensorboard_dir, lg.use_wandb, lg.wandb_project, lg.wandb_group, cfg.to_dict(),
        enabled=dist.get_rank() == 0, train_iters=d.train_iters,
        wandb_team=lg.wandb_team, wandb_host=lg.wandb_host, wandb_run_name=lg.wandb_run_name,
    )
    m = cfg.model
    fpt = flops_per_token(m.num_layers, m.hidden_size, m.seq_length, d.padded_vocab_size, d.intermediate_size,
                          gated=m.activation in GATED_ACTIVATIONS,
                          kv_hidden_size=d.num_kv_heads * m.hidden_size // m.num_attention_heads)
    peak = device_peak_flops(device, DTYPES[d.precision])
    needs_tokenizer = cfg.training.eod_mask_loss or cfg.evaluation.eval_tasks
    tok = config_tokenizer(cfg) if needs_tokenizer else None
    mask_token = tok.eod if cfg.training.eod_mask_loss else None
    tasks = None
    if cfg.evaluation.eval_tasks:
        from megatron.evaluation.run import TaskEvaluator  # imports lm_eval: only runs with eval tasks do

        tasks = TaskEvaluator(cfg, tok, stepper.engine.module, groups)
    return RunState(cfg, stepper, scheduler, train, valid, test, logger, dp_rank, fpt, peak, load_plan, mask_token,
                    tasks)
