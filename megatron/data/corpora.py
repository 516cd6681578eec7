"""Built-in corpora that can be prepared offline: documents -> BPE tokenizer -> indexed dataset.

``CORPORA`` maps a name to a builder; ``prepare_data.py NAME`` runs it. A corpus module only has
to say which documents it holds (a function returning texts in a deterministic order); training
the tokenizer, encoding, writing and the "already prepared" check are shared by all of them, and
encoding goes through the same ``encode_to_indexed`` as ``tools/datasets/preprocess_data.py``.

Layout of a prepared corpus ``NAME`` under ``data_dir``::

    NAME/tokenizer.json              byte-level BPE, <|endoftext|> = 0, <|padding|> = 1
    NAME/NAME_text_document.{bin,idx}
    NAME/manifest.json               written last: its presence marks a complete run
"""

from __future__ import annotations

import json
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Callable

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocessing import encode_to_indexed
from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.train import train_bpe


@dataclass(frozen=True)
class CorpusOptions:
    """Knobs common to every corpus."""

    data_dir: str = "data"
    vocab_size: int = 8192
    max_mb: float = 20.0  # cap on raw text, so the default corpus prepares in about a minute
    force: bool = False
    progress: bool = True


@dataclass
class PreparedCorpus:
    """Where a prepared corpus lives and what it holds; ``reused`` when nothing was rebuilt."""

    name: str
    data_path: str
    vocab_file: str
    tokenizer_type: str
    documents: int
    tokens: int
    text_bytes: int
    seconds: float
    reused: bool


# ---- document sources ---------------------------------------------------------------------

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_documents(max_bytes: int) -> list[str]:
    """The Python standard library's .py sources, one document per file.

    Order is deterministic: library modules first, then test suites (less typical code, so they
    are the part the byte cap cuts), each in sorted path order; files are taken while they fit
    under ``max_bytes``. Installed third-party packages
    are excluded; files that are not valid UTF-8 (the test suite has deliberate ones) are skipped.
    """
    root = sysconfig.get_paths()["stdlib"]
    library: list[str] = []
    tests: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel_parts = os.path.relpath(dirpath, root).split(os.sep)
        bucket = tests if _TEST_DIRS.intersection(rel_parts) else library
        bucket.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    docs: list[str] = []
    total = 0
    for path in sorted(library) + sorted(tests):
        # Files that would overflow the cap are skipped, not a stopping point, so a small cap
        # still fills up with the smaller files that follow.
        if total + os.path.getsize(path) > max_bytes:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if total + size <= max_bytes and text.strip():
            docs.append(text)
            total += size
    return docs


# ---- shared pipeline ----------------------------------------------------------------------


def _paths(name: str, opts: CorpusOptions) -> tuple[str, str, str, str]:
    out_dir = os.path.join(opts.data_dir, name)
    prefix = os.path.join(out_dir, f"{name}_text_document")
    return out_dir, prefix, os.path.join(out_dir, "tokenizer.json"), os.path.join(out_dir, "manifest.json")


def _reuse_existing(name: str, opts: CorpusOptions) -> PreparedCorpus | None:
    """The prepared corpus if it is complete, valid and was built with the same options."""
    _, prefix, vocab_file, manifest_path = _paths(name, opts)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            return None
        if manifest.get("vocab_size") != opts.vocab_size or manifest.get("max_mb") != opts.max_mb:
            return None
        build_tokenizer("HFTokenizer", vocab_file)
        data = MMapIndexedDataset(prefix)
        if len(data) != manifest["documents"]:
            return None
    except (OSError, ValueError, KeyError):  # IndexedDatasetError and bad JSON are ValueErrors
        return None
    return PreparedCorpus(
        name, prefix, vocab_file, "HFTokenizer", manifest["documents"], manifest["tokens"],
        manifest["text_bytes"], 0.0, reused=True,
    )


def prepare_corpus(name: str, documents: Callable[[int], list[str]], opts: CorpusOptions) -> PreparedCorpus:
    """Train a tokenizer on ``documents(max_bytes)`` and write the indexed dataset."""
    if not opts.force:
        existing = _reuse_existing(name, opts)
        if existing is not None:
            return existing
    start = time.perf_counter()
    out_dir, prefix, vocab_file, manifest_path = _paths(name, opts)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the old outputs are about to be replaced
    texts = documents(int(opts.max_mb * 1e6))
    if not texts:
        raise ValueError(f"corpus {name!r}: no documents within {opts.max_mb} MB")
    train_bpe(texts, opts.vocab_size, vocab_file)
    tokenizer = build_tokenizer("HFTokenizer", vocab_file)
    total = sum(len(t.encode("utf-8")) for t in texts)
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {name}")
    try:
        stats = encode_to_indexed(
            texts, tokenizer, prefix, append_eod=True,
            progress=None if bar is None else (lambda _stats, nbytes: bar.update(nbytes)),
        )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    result = PreparedCorpus(
        name, prefix, vocab_file, "HFTokenizer", stats.documents, stats.tokens, stats.text_bytes,
        seconds, reused=False,
    )
    manifest = {"vocab_size": opts.vocab_size, "max_mb": opts.max_mb, **asdict(result)}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)
    return result


def build_stdlib(opts: CorpusOptions) -> PreparedCorpus:
    """The default offline corpus: the Python standard library's sources."""
    return prepare_corpus("stdlib", stdlib_documents, opts)


CORPORA: dict[str, Callable[[CorpusOptions], PreparedCorpus]] = {
    "stdlib": build_stdlib,
}

__all__ = ["CORPORA", "CorpusOptions", "PreparedCorpus", "prepare_corpus", "stdlib_documents"]
