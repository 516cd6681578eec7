"""Reading raw corpora: .jsonl / .jsonl.zst / .jsonl.gz (one JSON object a line) and .txt (one
whole document a file).

One place decides what a document is, because three consumers must agree on it exactly:
``tools/datasets/preprocess_data.py`` (offline tokenization), ``megatron.data.streaming``
(tokenization on the fly, which must yield the same tokens as the offline path) and
``tools/datasets/train_tokenizer.py``. The rules: blank lines are skipped silently; a line that
is not a JSON object, or whose key is not a string, is counted as bad and skipped; every other
line is one document, even an empty one (whether an empty document is written is the encoder's
business, not the reader's).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from typing import IO, Iterator


@dataclass
class ReadStats:
    """Input problems, counted per pass over the files."""

    lines: int = 0
    bad_json: int = 0
    missing_key: int = 0
    examples: list[str] = field(default_factory=list)

    def bad(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 5:  # a few locations help find the problem without flooding
            self.examples.append(f"{where}: {kind.replace('_', ' ')}")


def expand_inputs(spec: str | list[str], what: str = "--input") -> list[str]:
    """Comma-separated paths or globs (or a list of them), each glob sorted so the document
    order is reproducible; a file matched twice is read once, at its first position."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for part in filter(None, (p.strip() for p in parts)):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"{what} {part!r} matches no file")
        paths.extend(m for m in matches if m not in paths)
    if not paths:
        raise FileNotFoundError(f"{what} {spec!r} names no file")
    return paths


def open_binary(path: str) -> IO[bytes]:
    """Decompressing reader chosen by extension; callers split lines themselves so that one bad
    byte costs one line, not the file."""
    if path.endswith(".zst"):
        import zstandard

        # read_across_frames: shards concatenated from several zstd frames must be read to the end.
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def is_whole_file_document(path: str) -> bool:
    return path.endswith(".txt")


def read_whole_file(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def iter_raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes) of the non-blank lines of one jsonl file."""
    with open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def parse_line(line: bytes, key: str) -> tuple[str | None, str | None]:
    """(document text, None) for a good jsonl line, else (None, problem): "bad_json" for a line
    that is not a JSON object, "missing_key" for an object without a string under ``key``."""
    try:
        obj = json.loads(line)  # UnicodeDecodeError is a ValueError too
    except ValueError:
        return None, "bad_json"
    if not isinstance(obj, dict):
        return None, "bad_json"
    text = obj.get(key)
    return (text, None) if isinstance(text, str) else (None, "missing_key")


def iter_texts(paths: list[str], key: str, stats: ReadStats | None = None) -> Iterator[str]:
    """Every document of ``paths`` in order (see the module docstring for the rules)."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        if is_whole_file_document(path):
            stats.lines += 1
            yield read_whole_file(path)
            continue
        for lineno, line in iter_raw_lines(path):
            stats.lines += 1
            text, problem = parse_line(line, key)
            if problem is not None:
                stats.bad(problem, f"{path}:{lineno}")
            else:
                yield text
