"""The eval.py worker, and the harness tasks evaluated inside the training loop.

eval.py builds the model at the config's own layout (TP x PP x DP, the pipeline as training
builds it), loads `load` into it (any stored layout, megatron/checkpointing/loading.py) and runs
lm-evaluation-harness's `evaluate` with the harness model of harness.py. Global rank 0 prints the
harness's table and writes the results (GPT-NeoX's file name: [PREFIX_]eval_results_DATE.json)
and every request's response ([PREFIX_]eval_samples_DATE.jsonl). Stderrs are bootstrapped with
10,000 draws as in GPT-NeoX's eval.py, on rank 0 only (the other ranks skip it).

During training, `TaskEvaluator` runs the same harness model over the engine's module every
eval_interval iterations (eval_tasks_limit documents per task, no bootstrap) and logs the
metrics as records of type "tasks".
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import torch.distributed as dist
from torch import nn

from megatron.config import ConfigError, NeoXConfig
from megatron.evaluation.replica import Replica
from megatron.launcher.cli import split_worker_argv
from megatron.parallel.device import local_device
from megatron.parallel.groups import ParallelGroups
from megatron.tokenizer import AbstractTokenizer
from megatron.training.setup import init_distributed, load_for_inference, shutdown_distributed, worker_config

BOOTSTRAP_ITERS = 10_000


def harness_model(cfg: NeoXConfig, tok: AbstractTokenizer, module: nn.Module, groups: ParallelGroups,
                  progress: bool, lockstep: bool = False) -> Any:
    """lockstep: the module is a ZeRO-3 engine's, whose forwards gather parameters across replicas."""
    from megatron.evaluation.harness import NeoXLM  # imports lm_eval: only runs with eval tasks do

    d, ev = cfg.derived, cfg.evaluation
    replica = Replica(module, groups.tensor, groups.dp_rank, groups.dp_size, lockstep=lockstep)
    return NeoXLM(replica, tok, d.vocab_size, d.max_position_embeddings,
                  ev.eval_tasks_batch_size or d.micro_batch_size, cfg.training.seed, progress=progress)


def task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{"piqa/acc": 0.61, "lambada_openai/perplexity": 41.2, ...} from the harness's results
    (stderrs and aliases left out; a filter other than the default one is kept in the name)."""
    flat = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, flt = key.partition(",")
            if key in ("alias", "sample_len") or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            flat[f"{task}/{metric}" + ("" if flt in ("", "none") else f"_{flt}")] = float(value)
    return flat


def _evaluate(lm: Any, tasks: dict[str, Any], limit: int | None, bootstrap: int, samples: bool) -> dict[str, Any]:
    from lm_eval.evaluator import evaluate

    return evaluate(lm, tasks, limit=limit, bootstrap_iters=bootstrap, log_samples=samples, verbosity="WARNING")


class TaskEvaluator:
    """The training loop's harness evaluation over the engine's module (any layout)."""

    def __init__(self, cfg: NeoXConfig, tok: AbstractTokenizer, module: nn.Module, groups: ParallelGroups) -> None:
        from megatron.evaluation.tasks import load_tasks

        ev = cfg.evaluation
        self.names, self.limit = ev.eval_tasks, ev.eval_tasks_limit
        self.lm = harness_model(cfg, tok, module, groups, progress=False, lockstep=cfg.derived.zero_stage == 3)
        self.tasks = load_tasks(self.names, ev.eval_tasks_dir)  # read once; requests are rebuilt each time

    def __call__(self) -> dict[str, float]:
        return task_metrics(_evaluate(self.lm, self.tasks, self.limit, bootstrap=0, samples=False))


def build_model(cfg: NeoXConfig, groups: ParallelGroups) -> nn.Module:
    """The model as training lays it out, with the weights of `load` (initial ones without)."""
    from megatron.model.gpt import GPTModel, layer_defs
    from megatron.model.loss import loss_function
    from megatron.parallel.pipeline import to_pipeline_module

    d = cfg.derived
    defs = layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                      cfg.training.seed, device=local_device(), tp=groups.tensor, vocab_size=d.vocab_size)
    if d.pipelined:
        module = to_pipeline_module(defs, cfg.parallel, cfg.training, d.pipe_stages, d.data_parallel_size,
                                    loss_function(groups.tensor), mpu=groups)
    else:
        module = GPTModel(defs)
    return load_for_inference(module, cfg, groups, "evaluating")


def write_results(results: dict[str, Any], prefix: str) -> tuple[str, str]:
    """GPT-NeoX's results file name, and the per-request samples beside it."""
    from lm_eval.utils import handle_non_serializable

    stamp = datetime.now().strftime("%m-%d-%Y-%H-%M-%S")
    head = f"{prefix}_" if prefix else ""
    results_path, samples_path = f"{head}eval_results_{stamp}.json", f"{head}eval_samples_{stamp}.jsonl"
    samples = results.pop("samples", {})
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    with open(samples_path, "w", encoding="utf-8") as f:
        for task, items in samples.items():
            for item in items:
                f.write(json.dumps({"task": task, **item}, default=handle_non_serializable) + "\n")
    return results_path, samples_path


def run(argv: list[str]) -> None:
    configs, cli = split_worker_argv(argv)
    cfg, tok = worker_config(configs, cli, training=False)
    ev = cfg.evaluation
    if not ev.eval_tasks:
        raise ConfigError("set eval_tasks (in a config file, or `--eval_tasks lambada_openai piqa ...` after the "
                          "config files)")
    from megatron.evaluation.tasks import load_tasks

    tasks = load_tasks(ev.eval_tasks, ev.eval_tasks_dir)  # before any process group: a missing file is a plain error
    init_distributed(cfg)
    try:
        d, par = cfg.derived, cfg.parallel
        groups = ParallelGroups(d.pipe_stages, par.model_parallel_size, d.data_parallel_size, par.sequence_parallel)
        rank0 = dist.get_rank() == 0
        lm = harness_model(cfg, tok, build_model(cfg, groups), groups, progress=rank0)
        start = time.perf_counter()
        results = _evaluate(lm, tasks, ev.eval_tasks_limit, BOOTSTRAP_ITERS if rank0 else 0, samples=True)
        if rank0:
            from lm_eval.utils import make_table

            print(make_table(results), flush=True)
            paths = write_results(results, ev.eval_results_prefix)
            print(f"evaluated {', '.join(ev.eval_tasks)} in {time.perf_counter() - start:.1f} s; wrote "
                  f"{paths[0]} and {paths[1]}", flush=True)
    finally:
        shutdown_distributed()
