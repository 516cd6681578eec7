"""Inspect an mmap indexed dataset: counts, dtype, a decoded sample, and a format check.

    python tools/datasets/inspect_dataset.py data/stdlib/stdlib_text_document \\
        --tokenizer-type HFTokenizer --vocab-file data/stdlib/tokenizer.json --sample 3

Opening the dataset validates the header, the extents of PREFIX.idx against PREFIX.bin and
that no two documents overlap in .bin; ``--check`` also scans every token (ids must be
non-negative and, with a tokenizer, below its vocab size), as training does once per dataset
(``token_ids.check_token_ids``; this tool ignores and refreshes training's cache of the
scan). A dataset that fails exits 1 with the message, which names the offending file.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.data.indexed_dataset import IndexedDatasetError, MMapIndexedDataset, data_file_path  # noqa: E402
from megatron.data.token_ids import check_token_ids  # noqa: E402
from megatron.tokenizer import TOKENIZERS, AbstractTokenizer, build_tokenizer  # noqa: E402


def describe(ds: MMapIndexedDataset) -> list[str]:
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    documents = max(len(ds.doc_idx) - 1, 0)
    lines = [
        f"prefix: {ds.prefix}",
        f"dtype: {ds.dtype}",
        f"sequences: {len(ds)}",
        f"documents: {documents}",
        f"tokens: {int(sizes.sum())}",
        f".bin bytes: {os.path.getsize(data_file_path(ds.prefix))}",
    ]
    if len(sizes):
        lines.append(f"tokens per sequence: min {sizes.min()}, mean {sizes.mean():.1f}, max {sizes.max()}")
    return lines


def show_sample(ds: MMapIndexedDataset, i: int, max_tokens: int, tokenizer: AbstractTokenizer | None) -> list[str]:
    seq = ds[i]
    head = seq[:max_tokens]
    lines = [f"sequence {i}: {len(seq)} tokens; first {len(head)}: {head.tolist()}"]
    if tokenizer is not None:
        lines.append(f"decoded: {tokenizer.detokenize(head)!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx); a .bin or .idx path works too")
    p.add_argument("--tokenizer-type", default=None, help=f"decode samples with one of {', '.join(TOKENIZERS)}")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--sample", type=int, nargs="*", default=[0], help="sequence ids to show (default: 0)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to show per sample")
    p.add_argument("--check", action="store_true",
                   help="also scan every token id (against the tokenizer's vocabulary when one is given)")
    args = p.parse_args(argv)
    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    tokenizer = None
    if args.tokenizer_type or args.vocab_file:
        try:
            tokenizer = build_tokenizer(args.tokenizer_type or "HFTokenizer", args.vocab_file, args.merge_file)
        except (ValueError, FileNotFoundError) as err:
            p.error(str(err))
    try:
        ds = MMapIndexedDataset(prefix)
        print("\n".join(describe(ds)))
        if args.check:
            check_token_ids(ds, tokenizer.vocab_size if tokenizer else None, rescan=True)
        for i in args.sample:
            if not -len(ds) <= i < len(ds):
                print(f"sequence {i}: out of range for {len(ds)} sequences")
                continue
            print("\n".join(show_sample(ds, i, args.max_tokens, tokenizer)))
    except IndexedDatasetError as err:
        print(f"format check failed: {err}", file=sys.stderr)
        return 1
    print("format check: ok" + (" (all tokens scanned)" if args.check else " (header, extents and overlaps)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
