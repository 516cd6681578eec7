"""Pieces of the training step timed alone: the candidates of candidates.py, one component each.

A full step takes seconds and a shared 2-core machine is rarely quiet for long; a component takes
milliseconds, so it can be repeated many times and the best repetition kept (other processes
only ever add time). Variants of one component are interleaved repetition by repetition.

    python benchmarks/bench_components.py                    # all components, bf16
    python benchmarks/bench_components.py --dtype fp32 --only loss,optimizer

Components (shapes of the default benchmark model, h512 L8 s512 b4 V50304):
    loss       logits [b*s, V] -> mean cross-entropy, forward + backward
    optimizer  one AdamW step over the model's parameters (gradients preset)
    rotary     rotary of q and k of ONE layer, forward + backward
    attention  causal SDPA of ONE layer, forward + backward
    attn_bwd   the backward of ONE layer's causal flash attention vs matmuls from its logsumexp
               (prints each variant's gradient error against an fp64 reference first)
    layer      ONE TransformerLayer, forward + backward (eager vs torch.compile)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import candidates  # noqa: E402
from megatron.config.schema import ModelConfig  # noqa: E402
from megatron.model.gpt import GPTModel, layer_defs  # noqa: E402
from megatron.model.loss import CompiledLoss, lm_loss  # noqa: E402
from megatron.model.rotary import RotaryEmbedding, apply_rotary  # noqa: E402
from megatron.model.transformer import TransformerLayer  # noqa: E402
from megatron.model.init import layer_generator  # noqa: E402
from megatron.training.optimizer import param_groups  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def race(variants: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Best time (ms) of each variant, repetitions interleaved."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    best = {name: float("inf") for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def model_config(args) -> ModelConfig:
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                       seq_length=args.seq, rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True)


def loss_variants(args, dtype):
    n = args.batch * args.seq
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, args.vocab, generator=gen) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (n,), generator=gen)

    def run(fn):
        def go():
            loss = fn(logits, labels)
            loss.backward()
            logits.grad = None
        return go
    out = {"lm_loss (fp32 upcast)": run(lm_loss),
           "loss_chunked (128 rows)": run(lambda x, y: candidates.chunked_lm_loss(x, y, 128)),
           "loss_chunked (512 rows)": run(lambda x, y: candidates.chunked_lm_loss(x, y, 512)),
           "CompiledLoss (compile_loss: true)": run(CompiledLoss()),
           "loss_split (128 rows)": run(lambda x, y: candidates.split_lm_loss(x, y, 128)),
           "loss_split (512 rows)": run(lambda x, y: candidates.split_lm_loss(x, y, 512))}
    if dtype != torch.float32:
        out["loss_bf16 (no upcast)"] = run(lambda x, y: F.cross_entropy(x, y))
    return out


def optimizer_variants(args, dtype):
    cfg = model_config(args)
    model = GPTModel(layer_defs(cfg, args.vocab, 4 * args.hidden, args.seq, 1234)).to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    groups = param_groups(model, 0.01)

    def make(**kw):
        opt = torch.optim.AdamW([dict(g) for g in groups], lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **kw)
        return opt.step
    return {"AdamW for-loop (torch's CPU default)": make(), "AdamW foreach": make(foreach=True),
            "AdamW fused (build_optimizer)": make(fused=True)}


def rotary_variants(args, dtype):
    b, s, heads, hd = args.batch, args.seq, args.heads, args.hidden // args.heads
    rot = int(hd * 0.25)
    emb = RotaryEmbedding(rot, 10000)
    cos, sin = emb.cos_sin(s, dtype)
    qkv = torch.randn(b, s, heads * 3 * hd, dtype=dtype, requires_grad=True)
    compiled = torch.compile(apply_rotary, dynamic=False)

    def run(rotate, tables: bool):
        def go():
            q, k, v = qkv.view(b, s, heads, 3 * hd).transpose(1, 2).split(hd, dim=-1)
            c, si = emb.cos_sin(s, dtype) if tables else (cos, sin)
            q, k = rotate(q, c, si), rotate(k, c, si)
            (q.sum() + k.sum()).backward()
            qkv.grad = None
        return go
    return {"apply_rotary (tables each call)": run(apply_rotary, True),
            "apply_rotary (cached tables)": run(apply_rotary, False),
            "rotate_onecat (cached tables)": run(candidates.rotate_onecat, False),
            "torch.compile(apply_rotary)": run(compiled, False)}


def attention_variants(args, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, s, heads, hd = args.batch, args.seq, args.heads, args.hidden // args.heads
    qkv = torch.randn(b, s, heads * 3 * hd, dtype=dtype, requires_grad=True)

    def run(backend):
        def go():
            q, k, v = qkv.view(b, s, heads, 3 * hd).transpose(1, 2).split(hd, dim=-1)
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.sum().backward()
            qkv.grad = None
        return go
    return {"SDPA flash (CPU default)": run(SDPBackend.FLASH_ATTENTION), "SDPA math": run(SDPBackend.MATH)}


def attention_backward_variants(args, dtype):
    b, heads, s, hd = args.batch, args.heads, args.seq, args.hidden // args.heads
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = ((torch.randn(b, heads, s, hd, generator=gen) * 2).to(dtype) for _ in range(4))
    scale = hd ** -0.5
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]

    def flash():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, scale=scale)[:3]

    def from_lse(fp32_scores):
        return lambda: candidates.attention_backward_from_lse(q, k, v, out, lse, dout, scale, fp32_scores)
    variants = {"flash backward (SDPA's CPU kernel)": flash,
                "matmuls from lse, bf16 scores": from_lse(False), "matmuls from lse, fp32 scores": from_lse(True)}
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref, is_causal=True, scale=scale).backward(dout.double())
    for name, fn in variants.items():
        errors = [float((g.double() - r.grad).norm() / r.grad.norm()) for g, r in zip(fn(), ref)]
        print(f"  {name:34s} relative error of dq, dk, dv vs fp64: " + ", ".join(f"{e:.1e}" for e in errors))
    return variants


def layer_variants(args, dtype):
    cfg = model_config(args)
    eager = TransformerLayer(cfg, 4 * args.hidden, layer_generator(1234, 2)).to(dtype)
    compiled = TransformerLayer(cfg, 4 * args.hidden, layer_generator(1234, 2)).to(dtype)
    # Attention, MLP and norms compiled, residual adds eager: see candidates.compile_blocks for
    # why the whole layer cannot be compiled.
    candidates.compile_blocks(compiled, None, None, None)
    x = torch.randn(args.batch, args.seq, args.hidden, dtype=dtype, requires_grad=True)

    def run(layer):
        def go():
            layer(x).sum().backward()
            x.grad = None
            layer.zero_grad(set_to_none=True)
        return go
    return {"TransformerLayer eager": run(eager), "TransformerLayer compile_blocks": run(compiled)}


COMPONENTS = {"loss": loss_variants, "optimizer": optimizer_variants, "rotary": rotary_variants,
              "attention": attention_variants, "attn_bwd": attention_backward_variants,
              "layer": layer_variants}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--only", default=",".join(COMPONENTS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50304, help="padded vocabulary")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, best of {args.reps}")
    for name in args.only.split(","):
        print(f"{name}:")
        variants = COMPONENTS[name](args, dtype)
        best = race(variants, args.reps)
        base = next(iter(best.values()))
        for variant, ms in best.items():
            print(f"  {variant:34s} {ms:9.1f} ms  {base / ms:5.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
