"""Train a byte-level BPE tokenizer the GPT-NeoX way and save it as a tokenizers JSON.

    python tools/datasets/train_tokenizer.py --input 'pile/*.jsonl.zst' \\
        --vocab-size 50277 --output data/tokenizer.json

The result loads as ``tokenizer_type: HFTokenizer`` / ``vocab_file: data/tokenizer.json``:
<|endoftext|> = 0, <|padding|> = 1, the last 23 ids are runs of 24..2 spaces (as ids 50254-50276
of GPT-NeoX-20B's tokenizer). Inputs are read like preprocess_data.py reads them (.jsonl,
.jsonl.zst, .jsonl.gz: one JSON object a line; .txt: one document a file) and streamed, so the
corpus never has to fit in memory. The training itself is megatron.tokenizer.train's, shared
with prepare_data.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterable, Iterator

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.data.text_files import ReadStats, expand_inputs, iter_texts  # noqa: E402
from megatron.tokenizer.train import MAX_SPACE_RUN, train_bpe  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="comma-separated files or globs (.jsonl[.zst|.gz], .txt)")
    p.add_argument("--jsonl-key", default="text", help="JSON key holding the text (default: text)")
    p.add_argument("--output", required=True, help="tokenizers JSON to write")
    p.add_argument("--vocab-size", type=int, default=50277, help="total ids, specials and space runs included")
    p.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are not merged")
    p.add_argument("--add-prefix-space", action="store_true",
                   help="treat every text piece as if preceded by a space (20B does not)")
    p.add_argument("--max-space-run", type=int, default=MAX_SPACE_RUN,
                   help="runs of 2..N spaces get their own ids (default: 24, as 20B); below 2: none")
    p.add_argument("--max-docs", type=int, default=None, help="stop reading after this many documents")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        args.paths = expand_inputs(args.input)
    except FileNotFoundError as err:
        p.error(str(err))
    return args


def _counted(texts: Iterable[str], totals: dict[str, int], bar, max_docs: int | None) -> Iterator[str]:
    """Pass texts through, counting documents and UTF-8 bytes for the bar and the summary."""
    for text in texts:
        if max_docs is not None and totals["documents"] >= max_docs:
            return
        nbytes = len(text.encode("utf-8"))
        totals["documents"] += 1
        totals["bytes"] += nbytes
        if bar is not None:
            bar.update(nbytes)
        yield text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    start = time.perf_counter()
    read = ReadStats()
    totals = {"documents": 0, "bytes": 0}
    bar = None if args.no_progress else tqdm(unit="B", unit_scale=True, desc="reading", mininterval=1.0)
    try:
        size = train_bpe(
            _counted(iter_texts(args.paths, args.jsonl_key, read), totals, bar, args.max_docs),
            args.vocab_size, args.output, add_prefix_space=args.add_prefix_space,
            max_space_run=args.max_space_run, min_frequency=args.min_frequency,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    for example in read.examples:
        print(f"warning: {example}", file=sys.stderr)
    if totals["documents"] == 0:
        os.remove(args.output)  # a tokenizer that learned nothing would only mislead
        print("error: no documents were read; check --input and --jsonl-key", file=sys.stderr)
        return 1
    print(
        f"{args.output}: vocab_size={size} documents={totals['documents']} bytes={totals['bytes']} "
        f"bad_json={read.bad_json} missing_key={read.missing_key} seconds={time.perf_counter() - start:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
