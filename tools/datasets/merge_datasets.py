"""Concatenate several mmap indexed datasets into one.

    python tools/datasets/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
    python tools/datasets/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

``--input`` takes dataset prefixes (PREFIX.bin/.idx), or directories whose every *.idx pair is
taken in sorted name order. The merged .bin is the inputs' .bin files back to back, byte for
byte; sequence and document ids of input k are shifted by the counts of inputs 0..k-1.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.data.indexed_dataset import IndexedDatasetError, merge_indexed_datasets  # noqa: E402


def expand_prefixes(inputs: list[str]) -> list[str]:
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p[: -len(".idx")] for p in glob.glob(os.path.join(item, "*.idx")))
            if not found:
                raise FileNotFoundError(f"--input {item!r}: directory holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(item[: -len(".idx")] if item.endswith((".idx", ".bin")) else item)
    return prefixes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or directories, in merge order")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        prefixes = expand_prefixes(args.input)
        merged = merge_indexed_datasets(prefixes, args.output_prefix, progress=not args.no_progress)
    except (IndexedDatasetError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"{args.output_prefix}: merged {len(prefixes)} datasets: sequences={len(merged)} "
        f"documents={max(len(merged.doc_idx) - 1, 0)} tokens={int(merged.sizes.sum(dtype='int64'))} "
        f"dtype={merged.dtype}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
