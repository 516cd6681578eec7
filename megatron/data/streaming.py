"""Training straight from raw jsonl / jsonl.zst shards, tokenized on the fly.

The stream. Epoch ``e`` reads the files in order (or, with a ``seed``, in a permutation seeded
by ``(seed, e)``), documents in file order, with exactly the reading rules of
``preprocess_data.py`` (``megatron.data.text_files``): each non-empty document's tokens
followed by the eod token. Epochs follow each other with no break, so the stream is endless.
Sample ``k`` is stream tokens ``k*L .. k*L + L`` (``L`` = seq_length): ``L + 1`` tokens sharing
one with the next sample, as in GPTDataset. Hence the stream of a corpus equals the
concatenated tokens of ``preprocess_data.py --append-eod`` over the same files, and sample ``k``
equals that dataset's tokens ``[k*L, k*L + L]`` read in file order without shuffling.

Workers. A pool of ``workers`` processes parses and tokenizes batches of lines while the main
process only decompresses and hands lines out; results come back in submission order, so the
stream does not depend on the worker count. At most ``4 * workers`` batches are in flight,
which bounds memory and lets tokenization run ahead of training.

Resuming. ``iter_samples(start)`` yields exactly what an uninterrupted iterator yields from
sample ``start``: it fast-forwards to stream token ``start * L`` without yielding. A file whose
token count is known is skipped without being read; any other file before that point is
tokenized (in the pool) and thrown away. Counts are learned whenever a file has been tokenized
to its end and kept in ``stream_token_counts.json`` in ``cache_dir`` (default: beside the first
file; a read-only directory only costs re-tokenizing on resume), keyed by path, size, mtime,
tokenizer files and text key, so a changed file or tokenizer is never skipped by a stale count.

Data parallelism. Every rank reads and tokenizes the whole stream and keeps its own samples
(``loader.micro_batches`` picks them), so each rank's workers must keep up with the global
token rate; samples are cheap views into the token buffer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import deque
from typing import Iterator, Sequence

import numpy as np

from megatron.data.text_files import expand_inputs, is_whole_file_document, iter_raw_lines, parse_line, read_whole_file
from megatron.tokenizer import AbstractTokenizer, build_tokenizer

logger = logging.getLogger(__name__)
TokenizerSpec = tuple[str, "str | None", "str | None"]
COUNTS_FILE = "stream_token_counts.json"

# ---- tokenizing a batch (in a pool worker or inline) ----------------------------------------

_worker_tokenizer: AbstractTokenizer | None = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker_tokenizer = build_tokenizer(*spec)


def _tokenize_batch(texts: list[str] | None, lines: list[bytes] | None, key: str,
                    tokenizer: AbstractTokenizer | None = None) -> np.ndarray:
    """Tokens of a batch of documents, each followed by eod; empty documents are dropped and
    bad lines skipped, as preprocess_data.py does."""
    tok = tokenizer or _worker_tokenizer
    assert tok is not None, "pool initializer did not run"
    if texts is None:
        texts = [t for t in (parse_line(line, key)[0] for line in lines or []) if t is not None]
    parts = [np.asarray(ids + [tok.eod], dtype=np.int32) for ids in tok.tokenize_batch(texts) if ids]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


# ---- the streaming dataset ----------------------------------------------------------------


def _file_digest(path: str | None) -> str:
    if path is None or not os.path.isfile(path):
        return "-"
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


class StreamingDataset:
    """An endless stream of ``seq_length + 1``-token samples from raw text files."""

    def __init__(
        self,
        files: Sequence[str] | str,
        tokenizer_spec: TokenizerSpec,
        seq_length: int,
        seed: int | None = None,
        workers: int = 1,
        text_key: str = "text",
        batch_lines: int = 32,
        cache_dir: str | None = None,
    ) -> None:
        if seq_length < 1 or workers < 0 or batch_lines < 1:
            raise ValueError(f"need seq_length >= 1, workers >= 0, batch_lines >= 1; got {seq_length}, "
                             f"{workers}, {batch_lines}")
        self.files = expand_inputs(files, what="streaming data path")
        self.tokenizer_spec = tuple(tokenizer_spec)
        self.tokenizer = build_tokenizer(*tokenizer_spec)  # fails early on a bad spec
        self.seq_length, self.seed, self.workers = seq_length, seed, workers
        self.text_key, self.batch_lines = text_key, batch_lines
        self.cache_path = os.path.join(cache_dir or os.path.dirname(os.path.abspath(self.files[0])), COUNTS_FILE)
        tok_id = "|".join([tokenizer_spec[0], _file_digest(tokenizer_spec[1]), _file_digest(tokenizer_spec[2])])
        self._key_suffix = f"{tok_id}|{text_key}"
        self.token_counts: dict[str, int] = self._load_counts()

    # ---- file order and token-count memo ----
    def file_order(self, epoch: int) -> list[str]:
        if self.seed is None:
            return list(self.files)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        return [self.files[i] for i in rng.permutation(len(self.files))]

    def _count_key(self, path: str) -> str:
        st = os.stat(path)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{self._key_suffix}"

    def _load_counts(self) -> dict[str, int]:
        try:
            with open(self.cache_path) as f:
                counts = json.load(f)
            return {k: int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}
        except (OSError, ValueError):
            return {}

    def _record_count(self, path: str, tokens: int) -> None:
        key = self._count_key(path)
        if self.token_counts.get(key) == tokens:
            return
        self.token_counts[key] = tokens
        merged = {**self._load_counts(), **self.token_counts}  # keep what other ranks wrote
        tmp = f"{self.cache_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, self.cache_path)
        except OSError as err:
            logger.warning("streaming: cannot save token counts to %s (%s); resuming will re-tokenize",
                           self.cache_path, err)

    # ---- token chunks ----
    def _batches(self, path: str) -> Iterator[tuple[list[str] | None, list[bytes] | None]]:
        if is_whole_file_document(path):
            yield [read_whole_file(path)], None
            return
        lines: list[bytes] = []
        for _, line in iter_raw_lines(path):
            lines.append(line)
            if len(lines) == self.batch_lines:
                yield None, lines
                lines = []
        if lines:
            yield None, lines

    def _chunks(self, skip_tokens: int, pool) -> Iterator[np.ndarray]:
        """Token chunks of the stream from token ``skip_tokens`` on (see "Resuming")."""
        pos, epoch = 0, 0
        while True:
            epoch_start = pos
            for path in self.file_order(epoch):
                known = self.token_counts.get(self._count_key(path))
                if known is not None and pos + known <= skip_tokens:
                    pos += known
                    continue
                file_tokens = 0
                for chunk in self._file_chunks(path, pool):
                    file_tokens += len(chunk)
                    if pos + len(chunk) > skip_tokens:
                        yield chunk[max(skip_tokens - pos, 0):]
                    pos += len(chunk)
                self._record_count(path, file_tokens)
            if pos == epoch_start:
                raise ValueError(f"streaming: the files {self.files} hold no documents under key {self.text_key!r}")
            epoch += 1

    def _file_chunks(self, path: str, pool) -> Iterator[np.ndarray]:
        if pool is None:
            for texts, lines in self._batches(path):
                yield _tokenize_batch(texts, lines, self.text_key, self.tokenizer)
            return
        pending: deque = deque()
        for texts, lines in self._batches(path):
            pending.append(pool.apply_async(_tokenize_batch, (texts, lines, self.text_key)))
            if len(pending) >= 4 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    # ---- samples ----
    def iter_samples(self, start: int = 0) -> Iterator[np.ndarray]:
        """Samples ``start, start + 1, ...`` (int64 arrays of seq_length + 1 tokens), endless."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        L = self.seq_length
        pool = None
        if self.workers > 0:
            pool = multiprocessing.get_context("fork").Pool(self.workers, _init_worker, (self.tokenizer_spec,))
        try:
            tail = np.empty(0, dtype=np.int32)
            for chunk in self._chunks(start * L, pool):
                buf = np.concatenate([tail, chunk]) if len(tail) else chunk
                n = (len(buf) - 1) // L if len(buf) > L else 0
                for k in range(n):
                    yield buf[k * L:k * L + L + 1].astype(np.int64)
                tail = buf[n * L:]
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
