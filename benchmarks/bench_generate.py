"""Generation throughput: our cached greedy decoding against transformers' `generate`.

Same weights (our seeded model copied into GPTNeoXForCausalLM with megatron/checkpointing/hf.py),
same left-padded prompts of different lengths, fp32, greedy, the same number of new tokens.
Sides, run interleaved `--repeats` times after one warm-up each; medians reported:

    ours        megatron.generation.generate with the key/value cache
    recompute   the same without the cache (the whole sequence every step, GPT-NeoX's recompute)
    hf          GPTNeoXForCausalLM.generate(do_sample=False), its default (sdpa) attention and cache

    python benchmarks/bench_generate.py                       # h256 L4 V50304, batch 4, 64 new tokens
    python benchmarks/bench_generate.py --hidden 512 --layers 8 --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron.checkpointing.hf import to_hf_model  # noqa: E402
from megatron.config.schema import ModelConfig  # noqa: E402
from megatron.generation.generator import generate  # noqa: E402
from megatron.model import GPTModel, layer_defs  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304, help="a multiple of 128: no padded rows")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32, help="longest prompt; the others are shorter")
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    return p.parse_args()


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                    seq_length=args.prompt + args.new, rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True,
                    bias_gelu_fusion=True, init_method="small_init", output_layer_init_method="wang_init")
    positions, ffn = args.prompt + args.new, 4 * args.hidden
    ours = GPTModel(layer_defs(m, args.vocab, ffn, positions, seed=0, vocab_size=args.vocab)).eval()
    hf = to_hf_model(m, ours, args.vocab, ffn, positions, "sdpa").eval().to(args.device)
    ours = ours.to(args.device)
    gen = torch.Generator().manual_seed(1)
    lengths = [max(1, args.prompt - i * args.prompt // (2 * args.batch)) for i in range(args.batch)]
    prompts = [torch.randint(0, args.vocab, (n,), generator=gen).tolist() for n in lengths]
    eod = args.vocab - 1
    longest = max(lengths)
    ids = torch.tensor([[eod] * (longest - len(p)) + p for p in prompts], device=args.device)
    mask = (torch.arange(longest) >= torch.tensor([longest - n for n in lengths]).unsqueeze(1)).long().to(args.device)

    def run_ours(recompute: bool) -> list[list[int]]:
        out = generate(ours, prompts, args.new, eod, args.vocab, positions, recompute=recompute)
        return [c.tokens for c in out]

    @torch.no_grad()
    def run_hf() -> list[list[int]]:
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                          eos_token_id=eod, pad_token_id=eod)
        return [row[:row.index(eod)] if eod in row else row for row in out[:, longest:].tolist()]

    sides = {"ours": lambda: run_ours(False), "recompute": lambda: run_ours(True), "hf": run_hf}
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs = {name: fn() for name, fn in sides.items()}  # warm-up, and the tokens to compare
    for _ in range(args.repeats):
        for name, fn in sides.items():
            seconds, _ = timed(fn)
            times[name].append(seconds)
    tokens = sum(map(len, outputs["ours"]))
    print(f"h{args.hidden} L{args.layers} V{args.vocab}, batch {args.batch} (prompts of {min(lengths)}-{longest} "
          f"tokens), {args.new} new tokens, fp32, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats")
    print(f"same tokens: ours = recompute {outputs['ours'] == outputs['recompute']}, ours = hf {outputs['ours'] == outputs['hf']}"
          f" ({tokens} generated)")
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:10s} {rate[name]:9,.0f} tokens/s   median {statistics.median(t) * 1000:8.1f} ms "
              f"(min {min(t) * 1000:.1f})")
    print(f"ours / hf = {rate['ours'] / rate['hf']:.2f}   ours / recompute = {rate['ours'] / rate['recompute']:.2f}")


if __name__ == "__main__":
    main()
