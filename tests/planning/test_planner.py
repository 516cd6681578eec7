"""The planner (megatron/planning): step time against published runs, memory against CPU runs
measured here, cluster-file validation, the dry-run report and --search."""

from __future__ import annotations

import re

import pytest
import yaml
# tests/ is on sys.path (pytest.ini), so this directory imports as a namespace package.
from planning.published import CLUSTERS, ROOT, RUNS, config

from megatron.config import ConfigError, load_config
from megatron.planning.cluster import load_cluster
from megatron.planning.memory import (backward_transient_bytes, layer_activation_bytes, layout_of, memory_plan,
                                      model_shape, plan_config, stage_plans)
from megatron.planning.search import search
from megatron.planning.step_time import Kernels, step_time, throughput

GiB = 2**30


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_published_throughput_within_10_percent(run, tmp_path):
    cfg = config(run, tmp_path)
    shape, lay = model_shape(cfg), layout_of(cfg).with_(**run.layout)
    got = throughput(step_time(shape, lay, run.cluster, run.kernels), lay.world, run.cluster).tflops_per_gpu
    assert abs(got / run.tflops - 1) <= 0.10, f"{run.name}: predicted {got:.1f}, published {run.tflops} ({run.source})"


def test_mt_nlg_loses_throughput_as_data_parallelism_grows(tmp_path):
    """Fixed global batch: more data-parallel ranks means fewer micro-batches per pipeline, a
    larger bubble. The published trend is 126 > 121 > 113."""
    got = []
    for run in RUNS[1:4]:
        cfg = config(run, tmp_path)
        lay = layout_of(cfg)
        got.append(throughput(step_time(model_shape(cfg), lay, run.cluster, run.kernels), lay.world, run.cluster).tflops_per_gpu)
    assert got[0] > got[1] > got[2]


# --- memory against CPU runs measured here --------------------------------------------------------

_CPU_BASE = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "seq_length": 256, "vocab_size": 1000,
             "pos_emb": "rotary", "rotary_pct": 0.25, "no_weight_tying": True, "pipe_parallel_size": 0,
             "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_iters": 10,
             "precision": "fp32", "checkpoint_activations": False,
             "optimizer": {"type": "Adam", "params": {"lr": 1.0e-4}}}
# Layouts one CPU process can vary: architecture, micro-batch, checkpointing, tied embeddings.
CPU_LAYOUTS = {
    "gpt-neox (parallel residual, rotary)": {"gpt_j_residual": True},
    "llama (swiglu, 2 kv heads, rmsnorm, no biases)": {"activation": "swiglu", "num_kv_heads": 2, "norm": "rmsnorm",
                                                       "use_bias_in_mlp": False},
    "checkpointed, micro-batch 8": {"checkpoint_activations": True, "checkpoint_num_layers": 1,
                                    "train_micro_batch_size_per_gpu": 8},
    "learned positions, tied, micro-batch 6": {"pos_emb": "learned", "no_weight_tying": False,
                                               "train_micro_batch_size_per_gpu": 6},
}


def test_memory_estimate_within_15_percent_of_cpu_runs(tmp_path):
    """Peak tensor memory of a real training step (torch's allocator as its profiler records it,
    see megatron/planning/measure.py) against the estimate, for several layouts in one process."""
    import torch

    from megatron.planning.measure import measure

    torch.set_num_threads(1)
    for name, extra in CPU_LAYOUTS.items():
        path = tmp_path / "cpu.yml"
        path.write_text(yaml.safe_dump({**_CPU_BASE, **extra}))
        cfg = load_config([str(path)], require_files=False)
        est = plan_config(cfg)[2].total
        got = measure(cfg).peak_bytes
        assert abs(est / got - 1) <= 0.15, f"{name}: estimated {est / 2**20:.1f} MiB, measured {got / 2**20:.1f} MiB"


# Layouts that need several processes: the framework's own DeepSpeed engine on gloo, so DeepSpeed's
# allocations (ZeRO's partitions and buckets, the pipeline engine's buffers) are measured too.
_LAYOUT_BASE = {**_CPU_BASE, "gpt_j_residual": True, "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 4}
MULTI_PROCESS_LAYOUTS = {
    "TP 2": ({"model_parallel_size": 2}, 2),
    "PP 2, 1F1B with 4 micro-batches": ({"pipe_parallel_size": 2}, 2),
    "DP 2, ZeRO-1": ({"zero_optimization": {"stage": 1}}, 2),
    "TP 2 x PP 2": ({"model_parallel_size": 2, "pipe_parallel_size": 2}, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MULTI_PROCESS_LAYOUTS))
def test_memory_estimate_within_15_percent_of_multi_process_cpu_runs(name, tmp_path):
    """Every rank's peak (megatron/planning/measure.py `measure_engine`) against its pipeline
    stage's estimate; the stage's heaviest rank counts."""
    import json

    from helpers import run_distributed
    from planning.memory_workers import measure_rank

    extra, world = MULTI_PROCESS_LAYOUTS[name]
    path = tmp_path / "layout.yml"
    path.write_text(yaml.safe_dump({**_LAYOUT_BASE, **extra}))
    cfg = load_config([str(path)], world_size=world, require_files=False)
    shape, lay, _ = plan_config(cfg)
    run_distributed(measure_rank, world, str(path), str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert sorted({g["stage"] for g in got}) == list(range(lay.pp))
    for stage, plan in enumerate(stage_plans(shape, lay)):
        peak = max(g["peak"] for g in got if g["stage"] == stage)
        assert abs(plan.total / peak - 1) <= 0.15, (
            f"{name}, stage {stage}: estimated {plan.total / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB")


# --- the memory model's parts ---------------------------------------------------------------------

def _cfg(tmp_path, world: int | None = None, **values):
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump({**_CPU_BASE, **values}))
    return load_config([str(path)], world_size=world, require_files=False)


def test_activation_count_for_gqa_and_gated_mlp(tmp_path):
    """h 256, 8 heads of 32, 2 kv heads (kv = 64), swiglu f = 4h*2/3 rounded: tokens 256 x 4 in fp32.
    Per token: norms 4h + 2h (RMSNorm), attention (h + 2kv) + (h + kv) + 2h, MLP 4f."""
    cfg = _cfg(tmp_path, activation="swiglu", num_kv_heads=2, norm="rmsnorm")
    shape, lay, _ = plan_config(cfg)
    h, kv, f = 256, 64, cfg.derived.intermediate_size
    per_token = (6 * h + (h + 2 * kv) + (h + kv) + 2 * h + 4 * f) * 4
    assert layer_activation_bytes(shape, lay) == 256 * 4 * per_token
    assert backward_transient_bytes(shape, lay) == 256 * 4 * (f + h) * 4


def test_tensor_and_sequence_parallelism_split_activations(tmp_path):
    cfg = _cfg(tmp_path, model_parallel_size=2, world=2, precision="bfloat16")
    shape, lay, _ = plan_config(cfg)
    plain = layer_activation_bytes(shape, lay)
    sp = layer_activation_bytes(shape, lay.with_(sequence_parallel=True))
    replicated = 256 * 4 * 4 * 256 * 2  # 4h norm tensors, bf16
    assert plain - sp == replicated // 2
    ckpt = lay.with_(checkpoint=True)
    assert memory_plan(shape, ckpt).activations == 2 * memory_plan(shape, ckpt.with_(partition_activations=True)).activations


def test_1f1b_keeps_pp_micro_batches_in_flight_on_the_first_stage(tmp_path):
    cfg = _cfg(tmp_path, pipe_parallel_size=4, world=4, gradient_accumulation_steps=8)
    shape, lay, mem = plan_config(cfg)
    assert mem.stage == 0
    assert mem.activations == 4 * layer_activation_bytes(shape, lay)  # 1 layer per stage, 4 in flight
    # With 2 micro-batches the last stage (logits kept in DeepSpeed's pipe buffers) is the heaviest.
    assert stage_plans(shape, lay.with_(grad_accum=2))[0].activations == 2 * layer_activation_bytes(shape, lay)


def test_zero_stages_shard_state(tmp_path):
    cfg = _cfg(tmp_path, world=4, precision="bfloat16")
    shape, lay, _ = plan_config(cfg)
    plans = {z: memory_plan(shape, lay.with_(zero_stage=z)) for z in (0, 1, 2, 3)}
    assert plans[0].optimizer == 4 * plans[1].optimizer
    assert plans[1].gradients == 4 * plans[2].gradients
    assert plans[2].weights == 4 * plans[3].weights
    # ZeRO's fp32 master partition exists in fp32 runs too: 12 bytes a parameter, not Adam's 8.
    fp32 = lay.with_(precision="fp32")
    params = plans[0].stage_parameters[0]
    assert memory_plan(shape, fp32.with_(zero_stage=0)).optimizer == 8 * params
    assert memory_plan(shape, fp32.with_(zero_stage=1)).optimizer == 12 * params // 4
    # ZeRO-1 without overlap_comm or contiguous_gradients flattens its bucket after backward:
    # it competes with the activations instead of adding to them.
    after = memory_plan(shape, fp32.with_(zero_stage=1))
    during = memory_plan(shape, fp32.with_(zero_stage=1, contiguous_gradients=True))
    assert during.total - after.total == min(during.buckets, after.activations + after.peak_activity)


# --- step time ------------------------------------------------------------------------------------

def test_step_time_parts_follow_the_layout(tmp_path):
    cfg = load_config([str(ROOT / "configs" / "20B.yml")], world_size=96, num_nodes=12, require_files=False)
    shape, lay = model_shape(cfg), layout_of(cfg)
    cluster = load_cluster(CLUSTERS / "a100-40gb.yml")
    st = step_time(shape, lay, cluster, Kernels(blocking_pipeline=False))
    # 1F1B bubble: (p - 1) micro-batch times against m = 32 of them.
    assert st.bubble / (st.compute + st.tensor_parallel + st.pipeline_p2p) == pytest.approx(3 / 32)
    # Interleaving with v = 2 halves it, less the doubled sends each micro-batch time now holds.
    st2 = step_time(shape, lay.with_(virtual_stages=2), cluster, Kernels(blocking_pipeline=False))
    assert st.bubble / 2 < st2.bubble < st.bubble / 2 * 1.02
    assert st2.pipeline_p2p == pytest.approx(2 * st.pipeline_p2p)
    # Half the inter-node bandwidth: a slower data-parallel reduce (not overlapped) and p2p.
    slow = cluster.__class__(**{**cluster.__dict__, "inter_node_bandwidth_gbs": 12.5})
    st3 = step_time(shape, lay, slow, Kernels(blocking_pipeline=False, overlap_dp=False))
    st4 = step_time(shape, lay, cluster, Kernels(blocking_pipeline=False, overlap_dp=False))
    assert st3.data_parallel > 1.9 * st4.data_parallel * 0.99 and st3.pipeline_p2p > st4.pipeline_p2p
    # Checkpointing adds the recomputed forward to the hardware FLOPs only.
    st5 = step_time(shape, lay.with_(checkpoint=False), cluster)
    assert st5.model_flops == st.model_flops and st.hardware_flops / st.model_flops > 1.3
    assert st5.compute < st.compute


# --- cluster files --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a100-40gb", "a100-80gb", "h100-80gb", "cpu"])
def test_shipped_cluster_files_load(name):
    c = load_cluster(CLUSTERS / f"{name}.yml")
    assert c.peak_tflops > 0 and c.gpus_per_node >= 1 and c.source


def _bad(tmp_path, **change) -> str:
    values = yaml.safe_load((CLUSTERS / "a100-40gb.yml").read_text())
    values.update(change)
    for key in [k for k, v in change.items() if v is None]:
        del values[key]
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError) as err:
        load_cluster(path)
    return str(err.value)


def test_cluster_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yml"
    msg = _bad(tmp_path, peak_tflop=312)
    assert msg == f"unknown config key 'peak_tflop' in cluster file {path}; did you mean 'peak_tflops'?"
    assert _bad(tmp_path, gpus_per_node=None) == f"cluster file {path}: missing key(s) gpus_per_node"
    assert _bad(tmp_path, hbm_bandwidth_gbs=0) == f"cluster file {path}: hbm_bandwidth_gbs must be a number > 0, got 0"
    assert _bad(tmp_path, gpus_per_node=2.5) == f"cluster file {path}: gpus_per_node must be a whole number >= 1, got 2.5"
    with pytest.raises(ConfigError, match="cluster file .*nope.yml: not found"):
        load_cluster(tmp_path / "nope.yml")


def test_deepy_reports_a_bad_cluster_file_as_a_config_error(tmp_path, capsys, monkeypatch):
    import deepy
    import megatron.launcher.environment as environment

    monkeypatch.setattr(environment, "gpus_on_this_node", lambda: 0)
    bad = tmp_path / "c.yml"
    bad.write_text("name: x\n")
    code = deepy.main(["--dry-run", "train.py", str(ROOT / "configs" / "20B.yml"), "--cluster", str(bad)])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"config error: cluster file {bad}: missing key(s) gpu, peak_tflops")


# --- the dry-run report ---------------------------------------------------------------------------

PREDICTED = re.compile(r"^predicted: (\d+(?:\.\d+)?) TFLOPS per GPU, MFU (\d+\.\d)%, (\d+\.\d+) s per step, "
                       r"(fits|does not fit) \((\d+\.\d\d) of (\d+(?:\.\d+)?) GiB\)$")


def _dry_run(capsys, monkeypatch, *args) -> list[str]:
    import deepy
    import megatron.launcher.environment as environment

    monkeypatch.setattr(environment, "gpus_on_this_node", lambda: 0)
    assert deepy.main(["--dry-run", "train.py", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_ends_with_the_predicted_line(capsys, monkeypatch, tmp_path):
    cluster = str(CLUSTERS / "a100-40gb.yml")
    lines = _dry_run(capsys, monkeypatch, str(ROOT / "configs" / "20B.yml"), str(ROOT / "configs" / "local_setup.yml"),
                     "--cluster", cluster)
    predicted = [m for m in map(PREDICTED.match, lines) if m]
    assert len(predicted) == 1
    tflops, mfu, sec, fit, used, cap = predicted[0].groups()
    cfg = load_config([str(ROOT / "configs" / "20B.yml")], world_size=96, num_nodes=12, require_files=False)
    shape, lay, mem = plan_config(cfg)
    c = load_cluster(cluster)
    st = step_time(shape, lay, c)
    tp = throughput(st, 96, c)
    assert (float(tflops), float(mfu), float(sec)) == (round(tp.tflops_per_gpu, 1), round(100 * tp.mfu, 1), round(st.total, 3))
    assert (fit, float(used), float(cap)) == ("fits", round(mem.total / GiB, 2), 39.59)
    # The predicted line is the report's last before the launch commands.
    assert lines[lines.index(predicted[0].string) + 1].startswith("commands")
    extra = tmp_path / "no_ckpt.yml"
    extra.write_text("checkpoint_activations: false\n")
    lines = _dry_run(capsys, monkeypatch, str(ROOT / "configs" / "20B.yml"), str(ROOT / "configs" / "local_setup.yml"),
                     str(extra), "--cluster", cluster)
    assert [m.group(4) for m in map(PREDICTED.match, lines) if m] == ["does not fit"]


def test_search_finds_a_faster_20b_layout_that_fits(capsys, monkeypatch):
    """GPT-NeoX-20B on 96 A100-40GB (docs/planner.md): the configured TP2 x PP4 with micro-batch 4
    needs activation checkpointing; smaller micro-batches fit without it and skip the recompute."""
    cfg = load_config([str(ROOT / "configs" / "20B.yml")], world_size=96, num_nodes=12, require_files=False)
    shape, lay = model_shape(cfg), layout_of(cfg)
    cluster = load_cluster(CLUSTERS / "a100-40gb.yml")
    found = search(shape, lay, cluster)
    times = [c.time.total for c in found]
    assert times == sorted(times)
    assert all(c.memory.total <= 0.9 * cluster.memory_bytes for c in found)
    best = found[0]
    configured = step_time(shape, lay, cluster).total
    assert not best.layout.checkpoint and best.time.total < 0.7 * configured
    assert (best.layout.tp, best.layout.pp) == (4, 1)
    lines = _dry_run(capsys, monkeypatch, str(ROOT / "configs" / "20B.yml"), "--cluster",
                     str(CLUSTERS / "a100-40gb.yml"), "--search")
    assert any(line.endswith("<- configured") for line in lines)
    assert f"{len(found)} layouts fit" in lines


def test_dry_run_on_the_cpu_cluster(capsys, monkeypatch, tmp_path):
    """A CPU plan's fraction of a TFLOPS keeps three significant figures in the predicted line."""
    extra = tmp_path / "vocab.yml"
    extra.write_text("vocab_size: 512\n")
    lines = _dry_run(capsys, monkeypatch, str(ROOT / "configs" / "cpu_stdlib.yml"), str(extra),
                     "--cluster", str(CLUSTERS / "cpu.yml"))
    (m,) = [m for m in map(PREDICTED.match, lines) if m]
    assert m.group(1).startswith("0.") and len(m.group(1)) == 5 and m.group(4) == "fits"


def test_whole_run_time_and_cost(tmp_path):
    """train_iters steps at the predicted step time; the cost where the cluster file names a price."""
    import dataclasses

    from megatron.launcher.dry_run import report

    cfg = load_config([str(ROOT / "configs" / "20B.yml")], world_size=96, num_nodes=12, require_files=False)
    cluster = dataclasses.replace(load_cluster(CLUSTERS / "a100-40gb.yml"), price_per_gpu_hour=2.0)
    shape, lay, _ = plan_config(cfg)
    sec = step_time(shape, lay, cluster).total
    (line,) = [x for x in report(cfg, cluster).splitlines() if x.startswith("whole run:")]
    hours = 150_000 * sec / 3600 * 96
    assert line == (f"whole run: 150,000 steps, {150_000 * 1536 * 2048:,} tokens, {150_000 * sec / 86400:,.1f} days, "
                    f"{hours:,.1f} GPU-hours, ${hours * 2.0:,.0f}")
