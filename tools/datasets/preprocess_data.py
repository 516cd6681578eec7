"""Tokenize jsonl / jsonl.zst / jsonl.gz / txt files into mmap indexed datasets.

Flag-compatible with GPT-NeoX's tools/datasets/preprocess_data.py for the common flags:

    python tools/datasets/preprocess_data.py --input 'pile/*.jsonl.zst' \\
        --tokenizer-type HFTokenizer --vocab-file 20B_tokenizer.json --append-eod \\
        --output-prefix data/pile --workers 4

writes ``{output_prefix}_{key}_document.{bin,idx}`` for every ``--jsonl-keys`` key. A .jsonl
line is one JSON object; a .txt file is one whole document (under every key). Lines that are
not JSON objects or lack the key, and documents that tokenize to nothing, are counted and
reported but do not stop the run. Reading is megatron.data.text_files' (shared with the
streaming loader, which must produce the same tokens); the encoding loop is
megatron.data.preprocessing's (shared with prepare_data.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.data.preprocessing import EncodeStats, encode_to_indexed  # noqa: E402
from megatron.data.text_files import ReadStats, expand_inputs, iter_texts  # noqa: E402
from megatron.tokenizer import TOKENIZERS, build_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument(
        "--input", required=True, help="comma-separated files or globs (.jsonl, .jsonl.zst, .jsonl.gz, .txt)"
    )
    g.add_argument("--jsonl-keys", nargs="+", default=["text"], help="JSON keys to extract (default: text)")
    g.add_argument("--num-docs", type=int, default=None, help="expected documents, only for the progress bar")
    g.add_argument("--ftfy", action="store_true", help="repair mojibake and odd Unicode with ftfy before tokenizing")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help=f"one of {', '.join(TOKENIZERS)}")
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only mmap is written")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (order is preserved)")
    g.add_argument("--log-interval", type=int, default=100, help="refresh the counts on the bar every N documents")
    args = p.parse_args(argv)
    if args.workers < 1 or args.log_interval < 1:
        p.error("--workers and --log-interval must be at least 1")
    try:
        args.paths = expand_inputs(args.input)
        args.tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    return args


def encode_key(args: argparse.Namespace, key: str) -> tuple[str, EncodeStats, ReadStats]:
    from tqdm import tqdm

    prefix = f"{args.output_prefix}_{key}_document"
    read_stats = ReadStats()
    bar = tqdm(unit="B", unit_scale=True, desc=f"{key}", mininterval=1.0)
    last_logged = [0]

    def progress(stats: EncodeStats, nbytes: int) -> None:
        bar.update(nbytes)
        if stats.documents - last_logged[0] >= args.log_interval:
            last_logged[0] = stats.documents
            bar.set_postfix(docs=stats.documents, tokens=stats.tokens, refresh=False)

    texts = iter_texts(args.paths, key, read_stats)
    if args.ftfy:
        from ftfy import fix_text  # in requirements.txt; imported only when asked for

        texts = map(fix_text, texts)
    try:
        stats = encode_to_indexed(
            texts,
            args.tokenizer,
            prefix,
            append_eod=args.append_eod,
            workers=args.workers,
            tokenizer_spec=(args.tokenizer_type, args.vocab_file, args.merge_file),
            progress=progress,
        )
    finally:
        bar.close()
    return prefix, stats, read_stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    written = 0
    for key in args.jsonl_keys:
        prefix, stats, read = encode_key(args, key)
        for example in read.examples:
            print(f"warning: {example}", file=sys.stderr)
        written += stats.documents
        print(
            f"{prefix}: documents={stats.documents} tokens={stats.tokens} bytes={stats.text_bytes} "
            f"bad_json={read.bad_json} missing_key={read.missing_key} empty={stats.empty} "
            f"seconds={time.perf_counter() - start:.1f}"
        )
    if written == 0:
        print("error: no documents were written; check --input and --jsonl-keys", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
