"""Requests per second of our lm-evaluation-harness model against the harness's own `hf` backend.

One random GPT-NeoX-shaped model is written as a Hugging Face checkpoint, converted to ours with
tools/ckpts/convert_hf_to_neox.py, and both are evaluated on the same task subset through the
harness's `evaluate` (fp32, CPU, one process, the same batch size). Ours is the class eval.py
uses (megatron/evaluation/harness.py) over the plain layer list, as eval.py runs it at
pipe_parallel_size 0; the launch itself (a few seconds for the process group) is not timed.
The two sides alternate, each evaluation is timed whole (tokenizing, batching, scoring,
metrics), and the median of each side is reported with their ratio and the largest difference
of the per-request log-likelihoods.

    python prepare_data.py eval_tasks           # the task documents, once
    python benchmarks/bench_eval_vs_hf.py       # hidden 512, 8 layers, lambada_openai + piqa, 200 docs each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron.checkpointing.loading import load_model_weights  # noqa: E402
from megatron.config import load_config  # noqa: E402
from megatron.evaluation.harness import NeoXLM  # noqa: E402
from megatron.evaluation.replica import Replica  # noqa: E402
from megatron.evaluation.tasks import load_tasks  # noqa: E402
from megatron.model.gpt import GPTModel, layer_defs  # noqa: E402
from megatron.parallel.groups import SINGLE  # noqa: E402
from megatron.tokenizer.train import train_bpe  # noqa: E402
from megatron.training.setup import config_tokenizer  # noqa: E402
from tools.ckpts import convert_hf_to_neox  # noqa: E402


def hf_checkpoint(args: argparse.Namespace, out: Path) -> int:
    """A random GPTNeoXForCausalLM whose embedding has exactly the tokenizer's rows (extra rows
    would get probability under transformers but none under ours); returns that vocabulary."""
    import transformers

    text = "".join(Path(m.__file__).read_text() for m in (json, argparse, transformers, statistics, tempfile))
    vocab = train_bpe(iter([text[i:i + 4000] for i in range(0, len(text), 4000)]), args.vocab,
                      str(out / "tokenizer.json"))
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden, max_position_embeddings=args.seq,
        rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(str(out))
    return vocab


def ours(ckpt: Path, batch: int) -> NeoXLM:
    cfg = load_config([str(ckpt / "model.yml")], world_size=1, require_files=False, training=False)
    d = cfg.derived
    model = GPTModel(layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings, 0,
                                vocab_size=d.vocab_size))
    load_model_weights(model, str(ckpt), cfg, SINGLE)
    return NeoXLM(Replica(model.eval(), SINGLE, 0, 1), config_tokenizer(cfg), d.vocab_size, d.max_position_embeddings,
                  batch, progress=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192, help="BPE size to train (fewer if the text is short)")
    p.add_argument("--seq", type=int, default=512, help="max_position_embeddings of both models")
    p.add_argument("--tasks", nargs="+", default=["lambada_openai", "piqa"])
    p.add_argument("--limit", type=int, default=200, help="documents per task")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="evaluations per side, alternating")
    p.add_argument("--tasks-dir", default="data/eval_tasks")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        hf_dir, ckpt = Path(tmp) / "hf", Path(tmp) / "ours"
        vocab = hf_checkpoint(args, hf_dir)
        assert convert_hf_to_neox.main(["--input", str(hf_dir), "--output", str(ckpt), "--tp", "1", "--pp", "0"]) == 0
        sides = {"ours": ours(ckpt, args.batch),
                 "hf": HFLM(pretrained=str(hf_dir), batch_size=args.batch, device="cpu", dtype="float32")}
        print(f"model: hidden {args.hidden}, {args.layers} layers, vocabulary {vocab}, {args.seq} positions; "
              f"tasks {', '.join(args.tasks)}, {args.limit} documents each, batch {args.batch}; "
              f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
        times: dict[str, list[float]] = {name: [] for name in sides}
        responses: dict[str, dict] = {}
        requests = 0
        for r in range(args.rounds):
            for name, lm in sides.items():
                tasks = load_tasks(args.tasks, args.tasks_dir)
                start = time.perf_counter()
                out = evaluate(lm, tasks, limit=args.limit, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
                times[name].append(time.perf_counter() - start)
                responses[name] = {(t, s["doc_id"], i): resp[0][0] for t, items in out["samples"].items()
                                   for s in items for i, resp in enumerate(s["resps"])}
                requests = len(responses[name])
                print(f"round {r + 1} {name:4s}: {times[name][-1]:6.2f} s, {requests / times[name][-1]:7.1f} "
                      f"requests/s (load {os.getloadavg()[0]:.2f})", flush=True)
        diff = max(abs(responses["ours"][k] - responses["hf"][k]) for k in responses["hf"])
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"median: ours {requests / med['ours']:.1f} requests/s, hf backend {requests / med['hf']:.1f} "
              f"requests/s; ours / hf = {med['hf'] / med['ours']:.2f}x ({requests} requests; largest "
              f"log-likelihood difference {diff:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
