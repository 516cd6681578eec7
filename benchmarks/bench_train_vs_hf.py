"""Training throughput of our step against Hugging Face's GPTNeoXForCausalLM, on the CPU.

Every side runs forward -> fp32 cross-entropy -> backward -> AdamW -> zero_grad on the same
batch, from the same weights, with the same optimizer groups and hyper-parameters, no clipping;
steps of all sides are interleaved and the best and median step reported. Sides (--impls):

    hf        transformers (SDPA attention), torch's default AdamW, eager loss: as users run it
    ours      our GPTModel + build_optimizer (fused AdamW) + loss_function(compile_loss)
    ours-ds   build_engine(cfg) -> stepper.train_batch, the path train.py runs (bf16: fp32
              master weights, i.e. more work than the two above)
    ours+C    ours with a not-adopted candidate from candidates.py
    NAME@heap NAME in a second process with train.py's allocator setting (glibc keeps freed
              memory; process-wide, so it cannot be given to one side of a process)

benchmarks/README.md explains the sides, the measurements and the results.

    python benchmarks/bench_train_vs_hf.py                       # bf16 and fp32, default impls
    python benchmarks/bench_train_vs_hf.py --dtype bf16 --impls hf,ours@heap --iters 6 --quiet-wait 30
    python benchmarks/bench_train_vs_hf.py --dtype bf16 --impls ours --malloc heap --profile 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from megatron.checkpointing.hf import to_hf_model  # noqa: E402
from megatron.config import load_config  # noqa: E402
from megatron.model import gpt  # noqa: E402
from megatron.model.loss import lm_loss, loss_function  # noqa: E402
from megatron.parallel.device import keep_freed_host_memory  # noqa: E402
from megatron.training.flops import flops_per_token, measure_matmul_peak  # noqa: E402
from megatron.training.optimizer import build_optimizer, param_groups  # noqa: E402
from step_timing import Impl, manual_step, measured_step, profile_impl, wait_for_quiet  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GOALS = {"bf16": 1.5, "fp32": 1.1}  # ours / transformers tokens/s
MFU_GOAL = {"bf16": 0.5}  # achieved model FLOP/s / measured matmul peak


def write_config(args: argparse.Namespace, dtype: str, directory: str) -> str:
    """A GPT-NeoX YAML for the benchmark shape (GPT-NeoX-20B's layer recipe, smaller)."""
    values = {
        "num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
        "seq_length": args.seq, "max_position_embeddings": args.seq, "vocab_size": args.vocab,
        "rotary_pct": args.rotary_pct, "gpt_j_residual": True, "no_weight_tying": True,
        "norm": "layernorm", "pos_emb": "rotary", "activation": "gelu", "bias_gelu_fusion": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
        "train_iters": 1000,
        "optimizer": {"type": "Adam", "params": {"lr": 6.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "weight_decay": 0.01, "gradient_clipping": 0.0, "warmup": 0.0,
        "pipe_parallel_size": args.pipe, "model_parallel_size": 1,
        "bf16": {"enabled": dtype == "bf16"},
        # bf16 needs ZeRO 1 here (megatron.config.validate.check_precision); fp32 takes stage 0.
        "zero_optimization": {"stage": 1 if dtype == "bf16" else 0},
        "tokenizer_type": "HFTokenizer", "seed": 1234, "steps_per_print": 10**9,
        "compile_loss": args.compile_loss,
    }
    path = os.path.join(directory, f"bench_{dtype}.yml")
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    return path


def hf_twin(cfg, ours: gpt.GPTModel):
    """GPTNeoXForCausalLM with the same config and ours' weights, SDPA attention as ours."""
    d = cfg.derived
    return to_hf_model(cfg.model, ours, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings, "sdpa")


def model_loss(loss_fn: Callable) -> Callable:
    """(model, tokens, labels) -> loss, for manual_step."""
    return lambda model, tokens, labels: loss_fn(model(tokens), labels)


def hf_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return lm_loss(model(input_ids=tokens, use_cache=False).logits, labels)


def torch_adamw(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """What a transformers training script builds: torch's AdamW with its default kernel (a
    for-loop over parameters on the CPU), our groups and hyper-parameters."""
    params = cfg.optimizer.optimizer.params
    return torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=cfg.derived.lr,
                             betas=tuple(params.betas), eps=params.eps)


def our_model(cfg, dtype: torch.dtype) -> gpt.GPTModel:
    d = cfg.derived
    defs = gpt.layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                          cfg.training.seed, vocab_size=d.vocab_size)
    return gpt.GPTModel(defs).to(dtype).train()


def impl_names(args) -> list[str]:
    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    return names + [f"ours+{c.strip()}" for c in args.candidates.split(",") if c.strip()]


def ds_step(cfg, tokens, labels) -> Callable[[], float]:
    """The real training path: build_engine(cfg) -> stepper.train_batch, as train.py runs it."""
    from megatron.parallel.groups import ParallelGroups
    from megatron.training.engine import build_engine
    from megatron.training.setup import init_distributed

    # As megatron.training.setup.build_run does (a world of one process).
    init_distributed("gloo")
    d, par = cfg.derived, cfg.parallel
    groups = ParallelGroups(d.pipe_stages, par.model_parallel_size, d.data_parallel_size,
                            par.sequence_parallel)
    stepper, _ = build_engine(cfg, groups)
    gas = d.gradient_accumulation_steps
    return lambda: stepper.train_batch(iter([(tokens, labels)] * gas))


def build_impls(args, dtype_name: str, cfg, tokens, labels, names: list[str]) -> list[Impl]:
    """names without the @heap suffix; each Impl is named as given."""
    dtype = DTYPES[dtype_name]
    d = cfg.derived
    impls: list[Impl] = []
    ours_loss = model_loss(loss_function(compile=cfg.training.compile_loss))
    reference = None  # the fp32 GPTModel weights every side starts from
    for name in names:
        t0 = time.perf_counter()
        if name == "hf":
            if reference is None:
                reference = our_model(cfg, torch.float32)
            model = hf_twin(cfg, reference).to(dtype).train()
            impls.append(Impl(name, manual_step(model, torch_adamw(model, cfg), hf_loss, tokens, labels)))
        elif name == "ours":
            model = our_model(cfg, dtype)
            opt = build_optimizer(model, cfg.optimizer, d.lr)
            impls.append(Impl(name, manual_step(model, opt, ours_loss, tokens, labels)))
        elif name == "ours-ds":
            impls.append(Impl(name, ds_step(cfg, tokens, labels)))
        elif name.startswith("ours+"):
            import candidates

            cand = candidates.CANDIDATES[name[len("ours+"):]]
            model = our_model(cfg, dtype)
            model, loss_fn, opt = cand(model, cfg, build_optimizer(model, cfg.optimizer, d.lr), ours_loss)
            impls.append(Impl(name, manual_step(model, opt, loss_fn, tokens, labels)))
        else:
            raise SystemExit(f"unknown implementation {name!r}")
        impls[-1].setup_s = time.perf_counter() - t0
    return impls


def batch_for(args, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.derived.vocab_size, (args.batch, args.seq), generator=gen)
    return tokens, torch.roll(tokens, -1, dims=1)


def heap_worker(conn, args, dtype_name: str, config_path: str, names: list[str]) -> None:
    """Child process for the NAME@heap implementations: same build, keep_freed_host_memory() first."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not keep_freed_host_memory():
        raise SystemExit("@heap: keep_freed_host_memory did not apply (not glibc, or MALLOC_* set)")
    # A world of one of its own: the parent's process group (if any) set these for itself.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    warnings.filterwarnings("ignore")
    cfg = load_config([config_path], world_size=1, require_files=False)
    tokens, labels = batch_for(args, cfg)
    impls = {i.name: i for i in build_impls(args, dtype_name, cfg, tokens, labels, names)}
    conn.send({name: i.setup_s for name, i in impls.items()})
    while (name := conn.recv()) is not None:
        conn.send(measured_step(impls[name]))


class Runner:
    """Steps one implementation, in this process or in the @heap child."""

    def __init__(self, name: str, impl: Impl | None = None, conn=None) -> None:
        self.name, self.impl, self.conn = name, impl, conn
        self.results: list[dict] = []
        self.first_loss: float | None = None

    def step(self, quiet_wait: float) -> dict:
        if self.impl is not None:
            result = measured_step(self.impl, quiet_wait)
        else:
            wait_for_quiet(quiet_wait)
            self.conn.send(self.name[:-len("@heap")])
            try:
                result = self.conn.recv()
            except EOFError:
                raise SystemExit("the @heap process died (out of memory? run fewer implementations)") from None
        if self.first_loss is None:
            self.first_loss = result["loss"]
        return result


def run_dtype(args, dtype_name: str, tmp: str) -> list[dict]:
    import multiprocessing as mp

    dtype = DTYPES[dtype_name]
    config_path = write_config(args, dtype_name, tmp)
    cfg = load_config([config_path], world_size=1, require_files=False)
    d = cfg.derived
    tokens, labels = batch_for(args, cfg)
    names = impl_names(args)
    local = [n for n in names if not n.endswith("@heap")]
    remote = [n[:-len("@heap")] for n in names if n.endswith("@heap")]
    impls = {i.name: i for i in build_impls(args, dtype_name, cfg, tokens, labels, local)}
    setup = {name: i.setup_s for name, i in impls.items()}
    child = conn = None
    if remote:
        conn, child_conn = mp.get_context("spawn").Pipe()
        child = mp.get_context("spawn").Process(
            target=heap_worker, args=(child_conn, args, dtype_name, config_path, remote), daemon=True)
        child.start()
        setup.update({f"{n}@heap": t for n, t in conn.recv().items()})
    runners = [Runner(n, impls.get(n), None if n in impls else conn) for n in names]
    for r in runners:
        print(f"  [{dtype_name}] built {r.name} in {setup[r.name]:.1f}s", flush=True)

    # Warm-up (first steps allocate optimizer state; compiled candidates compile here).
    for it in range(args.warmup):
        for r in runners:
            res = r.step(0.0)
            print(f"  [{dtype_name}] warmup {it} {r.name}: {res['time']:.2f}s loss {res['loss']:.4f}", flush=True)
    peak = measure_matmul_peak(dtype, "cpu", n=1024, seconds=args.peak_seconds)
    for it in range(args.iters):
        for r in runners:
            res = r.step(args.quiet_wait)
            r.results.append(res)
            print(f"  [{dtype_name}] iter {it} {r.name}: {res['time']:.2f}s loss {res['loss']:.4f} "
                  f"(other processes: {res['foreign']:.2f} CPUs; {res['faults'] / 1e3:.0f}k page faults, "
                  f"{res['sys']:.2f}s system time)", flush=True)
    peak_after = measure_matmul_peak(dtype, "cpu", n=1024, seconds=args.peak_seconds)

    fpt = flops_per_token(args.layers, args.hidden, args.seq, d.padded_vocab_size, d.intermediate_size)
    tokens_per_step = args.batch * args.seq
    rows = []
    for r in runners:
        times = [x["time"] for x in r.results]
        best = min(times)  # on a shared machine other processes only ever add time
        at_best = r.results[times.index(best)]
        tps = tokens_per_step / best
        rows.append(dict(dtype=dtype_name, impl=r.name, step_s=best, median_s=statistics.median(times),
                         tps=tps, flops=tps * fpt, peak=max(peak, peak_after), peak_before=peak,
                         peak_after=peak_after, loss=r.first_loss, foreign=at_best["foreign"],
                         faults=statistics.median(x["faults"] for x in r.results),
                         sys_s=statistics.median(x["sys"] for x in r.results)))
    hf_tps = next((row["tps"] for row in rows if row["impl"] == "hf"), None)
    for row in rows:
        row["ratio"] = row["tps"] / hf_tps if hf_tps else None
    if conn is not None:
        conn.send(None)
        child.join(timeout=60)
    if args.profile:
        profile_impl(args, dtype_name, list(impls.values()))
    return rows


def print_report(args, rows: list[dict]) -> None:
    print()
    print(f"shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, seq {args.seq}, "
          f"batch {args.batch}, vocab {args.vocab} (padded {rows[0]['padded']}), ffn {4 * args.hidden}, "
          f"rotary_pct {args.rotary_pct}, parallel residual, untied embeddings, no dropout")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"model FLOPs/token {rows[0]['fpt'] / 1e6:.1f} M (flops_per_token), "
          f"{args.warmup} warmup + {args.iters} timed steps, interleaved; best step reported; malloc {args.malloc}")
    head = (f"{'dtype':5s} {'impl':38s} {'best s':>6s} {'median':>6s} {'tokens/s':>8s} {'vs hf':>6s} "
            f"{'GFLOP/s':>7s} {'of peak':>7s} {'other':>5s} {'faults':>6s} {'sys s':>5s} {'loss@1':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        print(f"{r['dtype']:5s} {r['impl'][:38]:38s} {r['step_s']:6.2f} {r['median_s']:6.2f} {r['tps']:8.0f} "
              f"{ratio:>6s} {r['flops'] / 1e9:7.1f} {r['flops'] / r['peak']:7.1%} {r['foreign']:5.2f} "
              f"{r['faults'] / 1e3:5.0f}k {r['sys_s']:5.2f} {r['loss']:7.4f}")
    print("(tokens/s, GFLOP/s, 'vs hf' and 'of peak' from the best step; 'other' = CPUs used by other "
          "processes during that step; faults = minor page faults per step, sys s = kernel CPU seconds per "
          "step, both medians)")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        r = next(r for r in rows if r["dtype"] == dtype)
        print(f"measured {dtype} matmul peak (1024^3, {torch.get_num_threads()} threads): "
              f"{r['peak_before'] / 1e9:.0f} GFLOP/s before, {r['peak_after'] / 1e9:.0f} after the timed "
              f"steps; the higher is used")
    print()
    for r in rows:
        if not r["impl"].startswith("hf") and r["ratio"]:
            print(f"{r['impl']}/transformers {r['dtype']}: {r['ratio']:.2f}x (goal {GOALS[r['dtype']]}x)")
    for r in rows:
        if r["dtype"] in MFU_GOAL and not r["impl"].startswith("hf"):
            print(f"{r['impl']} {r['dtype']} model FLOP/s / matmul peak: {r['flops'] / r['peak']:.1%} "
                  f"(goal {MFU_GOAL[r['dtype']]:.0%})")
    worst = max(r["foreign"] for r in rows)
    if worst > 0.25:
        print(f"WARNING: other processes used up to {worst:.2f} CPUs during the best steps: with "
              f"{torch.get_num_threads()} threads every parallel region then waits for a descheduled "
              f"thread, so these numbers are unreliable; rerun on an idle machine (--quiet-wait)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50277,
                   help="tokenizer entries (default: GPT-NeoX-20B's 50277, padded to 50304)")
    p.add_argument("--rotary-pct", type=float, default=0.25)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (optimizer state, compilation; the @heap process needs 2 "
                   "to stop page-faulting)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--impls", default="hf,hf@heap,ours@heap,ours-ds@heap",
                   help="comma list of hf, ours, ours-ds, each optionally NAME@heap")
    p.add_argument("--compile-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="compile_loss of ours and ours-ds (default: on)")
    p.add_argument("--candidates", default="", help="comma list from benchmarks/candidates.py")
    p.add_argument("--pipe", type=int, default=1, help="pipe_parallel_size of ours-ds (1: pipeline engine, "
                   "the default training path; 0: plain engine)")
    p.add_argument("--peak-seconds", type=float, default=1.0)
    p.add_argument("--malloc", choices=("glibc", "heap"), default="glibc",
                   help="heap: this process keeps freed memory too (keep_freed_host_memory); every impl in it")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each timed step wait up to S seconds for other processes to go quiet")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps of --profile-impl")
    p.add_argument("--profile-impl", default="ours")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--profile-shapes", action="store_true", help="group profiled ops by input shape")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "heap" and not keep_freed_host_memory():
        raise SystemExit("--malloc heap: keep_freed_host_memory did not apply (not glibc, or MALLOC_* set)")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("NEOX_DEVICE", "cpu")
    print(f"torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, malloc {args.malloc}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')!r}", flush=True)
    dtypes = ("bf16", "fp32") if args.dtype == "both" else (args.dtype,)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in dtypes:
            new = run_dtype(args, name, tmp)
            cfg = load_config([write_config(args, name, tmp)], world_size=1, require_files=False)
            for r in new:
                r["padded"] = cfg.derived.padded_vocab_size
                r["fpt"] = flops_per_token(args.layers, args.hidden, args.seq, cfg.derived.padded_vocab_size,
                                           cfg.derived.intermediate_size)
            rows += new
    print_report(args, rows)


if __name__ == "__main__":
    main()
