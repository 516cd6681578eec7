"""Texts -> tokens -> mmap indexed dataset: the loop shared by ``prepare_data.py`` (built-in
corpora) and ``tools/datasets/preprocess_data.py`` (user files), so both write identical data.

Texts are tokenized in batches (``tokenize_batch`` uses the Rust thread pool of ``tokenizers``);
with ``workers > 1`` batches go to a process pool whose ``imap`` keeps document order, which the
output must preserve so that document ids are reproducible.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_dtype
from megatron.tokenizer import AbstractTokenizer, build_tokenizer


@dataclass
class EncodeStats:
    """What one encoding run wrote; ``summary()`` is the line the tools print."""

    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    empty: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.text_bytes / 1e6 / max(self.seconds, 1e-9)
        return (
            f"documents={self.documents} tokens={self.tokens} bytes={self.text_bytes} "
            f"empty_skipped={self.empty} seconds={self.seconds:.1f} ({rate:.2f} MB/s)"
        )


# Each pool worker builds its own tokenizer once; a Rust tokenizer is not shared across forks.
_worker_tokenizer: AbstractTokenizer | None = None


def _init_worker(tokenizer_type: str, vocab_file: str | None, merge_file: str | None) -> None:
    global _worker_tokenizer
    # Workers already give parallelism; Rust threads in every worker would oversubscribe cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None, "pool initializer did not run"
    return _worker_tokenizer.tokenize_batch(texts)


def _batches(texts: Iterable[str], batch_size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, batch_size)):
        yield batch


def _encoded_batches(
    batches: Iterator[list[str]], tokenizer: AbstractTokenizer, pool, window: int
) -> Iterator[tuple[int, list[list[int]]]]:
    """(text bytes, token ids) per batch, in input order.

    With a pool, at most ``window`` batches are in flight: ``Pool.imap`` would read the whole
    input ahead into its task queue, so memory would grow with the corpus.
    """
    pending: deque = deque()
    for batch in batches:
        nbytes = sum(len(t.encode("utf-8")) for t in batch)
        if pool is None:
            yield nbytes, tokenizer.tokenize_batch(batch)
            continue
        pending.append((nbytes, pool.apply_async(_encode_in_worker, (batch,))))
        if len(pending) >= window:
            nb, result = pending.popleft()
            yield nb, result.get()
    while pending:
        nb, result = pending.popleft()
        yield nb, result.get()


def encode_to_indexed(
    texts: Iterable[str],
    tokenizer: AbstractTokenizer,
    out_prefix: str,
    append_eod: bool = True,
    workers: int = 1,
    batch_size: int = 64,
    tokenizer_spec: tuple[str, str | None, str | None] | None = None,
    progress: Callable[[EncodeStats, int], None] | None = None,
) -> EncodeStats:
    """Tokenize ``texts`` in order and write ``out_prefix.{bin,idx}``, one document each.

    Documents that tokenize to nothing are skipped and counted (``empty``), not written, since
    an eod-only document carries no text. ``tokenizer_spec`` = (type, vocab_file, merge_file)
    lets pool workers rebuild the tokenizer; it is required when ``workers > 1``. ``progress``
    is called after every batch with the running stats and that batch's text bytes.
    """
    if workers > 1 and tokenizer_spec is None:
        raise ValueError("encode_to_indexed: workers > 1 needs tokenizer_spec to rebuild the tokenizer in workers")
    stats = EncodeStats()
    start = time.perf_counter()
    builder = MMapIndexedDatasetBuilder(out_prefix, best_dtype(tokenizer.vocab_size))
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, tokenizer_spec)
        for nbytes, batch_ids in _encoded_batches(_batches(texts, batch_size), tokenizer, pool, 4 * workers):
            for ids in batch_ids:
                if not ids:
                    stats.empty += 1
                    continue
                if append_eod:
                    ids = list(ids) + [tokenizer.eod]
                builder.add_document(np.asarray(ids, dtype=np.int64))
                stats.documents += 1
                stats.tokens += len(ids)
            stats.text_bytes += nbytes
            if progress is not None:
                progress(stats, nbytes)
    except BaseException:
        builder.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    builder.finalize()
    stats.seconds = time.perf_counter() - start
    return stats
