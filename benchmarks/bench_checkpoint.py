"""Checkpoint tools against plain torch.load + torch.save of the same bytes, in the same run.

    python benchmarks/bench_checkpoint.py [--layers 8] [--hidden 1024] [--rounds 3] [--dir DIR]

Writes a synthetic checkpoint of this framework's pipeline layout at TP2 x PP2 (GPT-NeoX's 50,277
vocabulary, random weights: speed does not depend on the values), then times, each in a fresh
process and interleaved round by round:
- reshard:   tools/ckpts/reshard.py to TP1 x PP1 (read, merge, split, write every layer);
- to_hf:     tools/ckpts/convert_neox_to_hf.py to a transformers directory (100 MB safetensors shards);
- copy:      the limit: torch.load then torch.save of every file of the checkpoint, one at a time.
For each: GB/s (checkpoint bytes / seconds, median over rounds) and peak resident memory of the
process against the checkpoint's size (streaming tools must stay far below it). `startup` (Python
and the imports alone) is the floor of both columns. Prints ratios
against `copy`. Timings need a quiet machine (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 50277
COPY = """
import sys, torch
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True)
for f in sorted(src.glob("*.pt")):
    torch.save(torch.load(f, map_location="cpu", weights_only=False), dst / f.name)
"""


def synthetic(save: Path, layers: int, hidden: int) -> None:
    """Write the checkpoint. Runs in a child process: a child forked from a parent holding the
    tensors would count the parent's memory in its own peak (ru_maxrss covers the fork)."""
    import torch

    from megatron.checkpointing.writer import write_checkpoint
    from megatron.config.schema import ModelConfig

    model = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=16, seq_length=2048,
                        rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True)
    gen = torch.Generator().manual_seed(0)
    h, ffn = model.hidden_size, 4 * model.hidden_size

    def rand(*shape: int) -> "torch.Tensor":
        return torch.randn(*shape, generator=gen) * 0.02

    def layer_list():
        yield 0, {"word_embeddings.weight": rand(VOCAB, h)}
        for i in range(model.num_layers):
            yield 2 + i, {
                "input_layernorm.weight": torch.ones(h), "input_layernorm.bias": torch.zeros(h),
                "post_attention_layernorm.weight": torch.ones(h), "post_attention_layernorm.bias": torch.zeros(h),
                "attention.query_key_value.weight": rand(3 * h, h), "attention.query_key_value.bias": rand(3 * h),
                "attention.dense.weight": rand(h, h), "attention.dense.bias": rand(h),
                "mlp.dense_h_to_4h.weight": rand(ffn, h), "mlp.dense_h_to_4h.bias": rand(ffn),
                "mlp.dense_4h_to_h.weight": rand(h, ffn), "mlp.dense_4h_to_h.bias": rand(h),
            }
        yield model.num_layers + 3, {"norm.weight": torch.ones(h), "norm.bias": torch.zeros(h)}
        yield model.num_layers + 4, {"final_linear.weight": rand(VOCAB, h)}

    write_checkpoint(save, 0, layer_list(), model, VOCAB, tp=2, pp=2)


def timed(cmd: list[str]) -> tuple[float, int]:
    """Seconds and peak resident bytes of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary directory, removed at the end)")
    parser.add_argument("--make", help=argparse.SUPPRESS)  # internal: write the checkpoint there and exit
    args = parser.parse_args()
    if args.make:
        synthetic(Path(args.make), args.layers, args.hidden)
        return
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        timed([sys.executable, __file__, "--make", str(work / "src"), "--layers", str(args.layers),
               "--hidden", str(args.hidden)])
        src = work / "src" / "global_step0"
        size = sum(f.stat().st_size for f in src.glob("*.pt"))
        print(f"checkpoint: {size / 1e9:.2f} GB, {args.layers} layers, hidden {args.hidden}, TP2 x PP2")
        tools = {
            # the floor under every row: starting Python and importing torch and the package
            "startup": lambda out: [sys.executable, "-c", "import torch, megatron.checkpointing.writer"],
            "copy": lambda out: [sys.executable, "-c", COPY, str(src), str(out)],
            "reshard": lambda out: [sys.executable, "tools/ckpts/reshard.py", "--input", str(work / "src"),
                                    "--output", str(out), "--tp", "1", "--pp", "1"],
        }
        if (ROOT / "tools/ckpts/convert_neox_to_hf.py").is_file():
            # shards of ~100 MB: memory holds one shard and one layer (the default, 2 GB, would hold
            # this whole checkpoint before writing it)
            tools["to_hf"] = lambda out: [sys.executable, "tools/ckpts/convert_neox_to_hf.py", "--input",
                                          str(work / "src"), "--output", str(out), "--max-shard-mb", "100"]
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in tools}
        for round_ in range(args.rounds):
            for name, cmd in tools.items():  # interleaved: load changes hit every tool alike
                out = work / f"out_{name}"
                shutil.rmtree(out, ignore_errors=True)
                results[name].append(timed(cmd(out)))
                shutil.rmtree(out, ignore_errors=True)
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {r[-1][0]:.2f} s" for n, r in results.items()))
        base = statistics.median(t for t, _ in results["copy"])
        print(f"\n{'tool':8s} {'median s':>9s} {'GB/s':>6s} {'vs copy':>8s} {'peak RSS GB':>12s} {'RSS/ckpt':>9s}")
        for name, runs in results.items():
            t = statistics.median(s for s, _ in runs)
            rss = max(r for _, r in runs)
            print(f"{name:8s} {t:9.2f} {size / t / 1e9:6.2f} {base / t:8.2f} {rss / 1e9:12.2f} {rss / size:9.2f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
