"""Texts -> tokens -> mmap indexed dataset: the loop shared by ``prepare_data.py`` (built-in
corpora) and ``tools/datasets/preprocess_data.py`` (user files), so both write identical data.

Texts are tokenized in batches. With ``workers = 1`` two batches at a time run on background
threads (``tokenize_batch`` releases the GIL and uses the Rust thread pool of ``tokenizers``),
overlapping reading, JSON parsing and writing; with ``workers > 1`` batches go to a process pool.
Results are consumed in submission order either way, which the output must preserve so that
document ids are reproducible (and the bytes do not depend on ``workers``).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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


Packed = tuple[np.ndarray, np.ndarray]  # all ids of a batch back to back, and each document's length


def _encode_packed(tokenizer: AbstractTokenizer, texts: list[str]) -> Packed:
    """Ids of a batch as two arrays: a list of lists of Python ints costs far more to pickle
    back from a worker (and to hold) than the tokenization itself."""
    ids = tokenizer.tokenize_batch(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(texts: list[str]) -> Packed:
    assert _worker_tokenizer is not None, "pool initializer did not run"
    return _encode_packed(_worker_tokenizer, texts)


def _batches(texts: Iterable[str], batch_chars: int, max_docs: int = 4096) -> Iterator[list[str]]:
    """Batches of about ``batch_chars`` characters: sized by text rather than by document count,
    so corpora of long files and of short entries both get batches that keep the tokenizer's
    threads busy yet are numerous enough to pipeline (a handful of huge batches would leave
    threads idle behind the slowest)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded_batches(batches: Iterator[list[str]], submit: Callable, window: int) -> Iterator[tuple[int, Packed]]:
    """(text bytes, packed ids) per batch, in input order, with at most ``window`` batches in
    flight (``Pool.imap`` would read the whole input ahead, so memory would grow with it).

    ``submit(batch)`` returns something with ``.get()`` or ``.result()``: a process pool's or a
    thread pool's handle. Either way, reading and parsing the next batches overlaps tokenizing.
    """
    pending: deque = deque()
    for batch in batches:
        pending.append((sum(len(t.encode("utf-8")) for t in batch), submit(batch)))
        if len(pending) >= window:
            nbytes, handle = pending.popleft()
            yield nbytes, (handle.get() if hasattr(handle, "get") else handle.result())
    while pending:
        nbytes, handle = pending.popleft()
        yield nbytes, (handle.get() if hasattr(handle, "get") else handle.result())


def encode_to_indexed(
    texts: Iterable[str],
    tokenizer: AbstractTokenizer,
    out_prefix: str,
    append_eod: bool = True,
    workers: int = 1,
    batch_chars: int = 1 << 17,
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
    eod = np.array([tokenizer.eod], dtype=np.int64)
    pool = threads = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, tokenizer_spec)
            submit, window = (lambda batch: pool.apply_async(_encode_in_worker, (batch,))), 4 * workers
        else:
            # encode_batch releases the GIL and runs on the Rust thread pool: two batches in
            # flight keep its threads busy while this thread parses input and writes output.
            threads = ThreadPoolExecutor(2)
            submit, window = (lambda batch: threads.submit(_encode_packed, tokenizer, batch)), 4
        for nbytes, (flat, lengths) in _encoded_batches(_batches(texts, batch_chars), submit, window):
            offset = 0
            for n in lengths.tolist():
                if n == 0:
                    stats.empty += 1
                    continue
                ids = flat[offset:offset + n]
                offset += n
                if append_eod:
                    ids = np.concatenate([ids, eod])
                builder.add_document(ids)
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
        if threads is not None:
            threads.shutdown(cancel_futures=True)
    builder.finalize()
    stats.seconds = time.perf_counter() - start
    return stats
