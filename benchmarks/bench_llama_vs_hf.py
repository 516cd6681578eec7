"""Training step of a Llama-shaped model, ours against transformers' LlamaForCausalLM, on the CPU.

Both sides run forward -> fp32 cross-entropy -> backward -> AdamW -> zero_grad in fp32 on the same
batch, from the same weights (ours copied into LlamaForCausalLM by megatron/checkpointing/
hf_llama.py), with the same optimizer groups and hyper-parameters, no clipping. Steps of the two
sides alternate (so both see the same machine load) and the median step of each is reported,
with the best. As bench_train_vs_hf.py: transformers runs with SDPA attention, torch's default
AdamW and an eager loss, as a user's script would; ours runs GPTModel + build_optimizer + the
training loss (compiled unless --no-compile-loss), one process, no DeepSpeed.

    python benchmarks/bench_llama_vs_hf.py                              # hidden 512, 8 layers, GQA 8/2
    python benchmarks/bench_llama_vs_hf.py --kv-heads 8 --iters 7 --quiet-wait 30

The shape is Llama's recipe, smaller: RMSNorm, SwiGLU MLP of width 2/3 x 4h rounded up to 256,
full rotary, no biases, untied embeddings, vocabulary 32000. benchmarks/README.md has results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench_train_vs_hf import batch_for, hf_loss, model_loss, our_model, torch_adamw  # noqa: E402
from megatron.checkpointing.hf_llama import to_hf_model  # noqa: E402
from megatron.config import load_config  # noqa: E402
from megatron.model.loss import loss_function  # noqa: E402
from megatron.training.optimizer import build_optimizer  # noqa: E402
from step_timing import Impl, manual_step, measured_step  # noqa: E402


def write_config(args: argparse.Namespace, directory: str) -> str:
    """A GPT-NeoX YAML for the Llama-shaped benchmark model (fp32, one process)."""
    values = {
        "num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
        "num_kv_heads": args.kv_heads, "intermediate_size": 8 * args.hidden, "mlp_multiple_of": 256,
        "seq_length": args.seq, "max_position_embeddings": args.seq, "vocab_size": args.vocab,
        "norm": "rmsnorm", "rms_norm_epsilon": 1e-6, "activation": "swiglu", "pos_emb": "rotary",
        "rotary_pct": 1.0, "use_bias_in_norms": False, "use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
        "gpt_j_residual": False, "no_weight_tying": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1, "train_iters": 1000,
        "optimizer": {"type": "Adam", "params": {"lr": 3.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "weight_decay": 0.1, "gradient_clipping": 0.0, "warmup": 0.0, "pipe_parallel_size": 1,
        "model_parallel_size": 1, "zero_optimization": {"stage": 0}, "tokenizer_type": "HFTokenizer",
        "seed": 1234, "steps_per_print": 10**9, "compile_loss": args.compile_loss,
    }
    path = os.path.join(directory, "bench_llama.yml")
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    return path


def build(args: argparse.Namespace, cfg) -> list[Impl]:
    """hf and ours, from the same fp32 weights."""
    d = cfg.derived
    reference = our_model(cfg, torch.float32)
    hf = to_hf_model(cfg.model, reference, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                     "sdpa").train()
    tokens, labels = batch_for(args, cfg)
    ours = reference  # ours trains the reference itself: hf holds copies of its weights
    impls = [Impl("hf", manual_step(hf, torch_adamw(hf, cfg), hf_loss, tokens, labels)),
             Impl("ours", manual_step(ours, build_optimizer(ours, cfg.optimizer, d.lr),
                                      model_loss(loss_function(compile=cfg.training.compile_loss)), tokens, labels))]
    return impls


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (optimizer state, compilation)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile-loss", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each timed step wait up to S seconds for other processes to go quiet")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("NEOX_DEVICE", "cpu")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([write_config(args, tmp)], world_size=1, require_files=False)
    impls = build(args, cfg)
    for it in range(args.warmup):
        print("  warmup " + ", ".join(f"{i.name} {measured_step(i)['time']:.2f}s" for i in impls), flush=True)
    results: dict[str, list[dict]] = {i.name: [] for i in impls}
    for it in range(args.iters):
        for impl in impls:
            res = measured_step(impl, args.quiet_wait)
            results[impl.name].append(res)
            print(f"  iter {it} {impl.name}: {res['time']:.2f}s loss {res['loss']:.4f} "
                  f"(other processes: {res['foreign']:.2f} CPUs)", flush=True)

    d, tokens = cfg.derived, args.batch * args.seq
    print(f"\nshape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, kv heads {args.kv_heads}, "
          f"ffn {d.intermediate_size} (SwiGLU), seq {args.seq}, batch {args.batch}, vocab {args.vocab} "
          f"(padded {d.padded_vocab_size}), fp32; {args.warmup} warmup + {args.iters} timed steps, interleaved")
    median = {}
    for name, rows in results.items():
        times = [r["time"] for r in rows]
        median[name] = statistics.median(times)
        print(f"{name:5s} median {median[name]:6.3f}s  best {min(times):6.3f}s  {tokens / median[name]:7.0f} tokens/s"
              f"  other processes {statistics.median(r['foreign'] for r in rows):.2f} CPUs (median)")
    print(f"ours / transformers tokens/s (medians): {median['hf'] / median['ours']:.2f}x; "
          f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
