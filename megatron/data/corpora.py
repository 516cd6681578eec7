"""Built-in corpora: documents -> BPE tokenizer -> indexed dataset.

``CORPORA`` maps a name to a builder; ``prepare_data.py NAME`` runs it. A corpus only has to say
which documents it holds (``corpus_sources``: texts in a deterministic order); training the
tokenizer, encoding, writing and the "already prepared" check are shared by all of them, and
encoding goes through the same ``encode_to_indexed`` as ``tools/datasets/preprocess_data.py``.

    stdlib   the Python standard library's sources (always available, the default)
    debian   Python documentation + GCIDE dictionary from Debian packages (python3-doc, dict-gcide)
    enwik8   first 100 MB of English Wikipedia, downloaded (--url to use a mirror or a copy)
    pile     Pile-format .jsonl.zst shards downloaded from --url

Layout of a prepared corpus ``NAME`` under ``data_dir``::

    NAME/tokenizer.json              byte-level BPE, <|endoftext|> = 0, <|padding|> = 1
    NAME/NAME_text_document.{bin,idx}
    NAME/manifest.json               written last: its presence marks a complete run
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

from megatron.data.corpus_sources import (
    ENWIK8_URL,
    CorpusUnavailable,
    debian_documents,
    enwik8_documents,
    pile_documents,
    stdlib_documents,
)
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
    urls: tuple[str, ...] = ()  # downloads: override the default URL (enwik8) or name the shards (pile)
    timeout: float = 60.0  # seconds before a download that gets no answer gives up
    system_root: str = "/"  # where installed packages are looked up (tests point it elsewhere)


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
        if (manifest.get("vocab_size"), manifest.get("max_mb"), manifest.get("urls")) != (
            opts.vocab_size, opts.max_mb, list(opts.urls)
        ):
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
    manifest = {"vocab_size": opts.vocab_size, "max_mb": opts.max_mb, "urls": list(opts.urls), **asdict(result)}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)
    return result


def build_stdlib(opts: CorpusOptions) -> PreparedCorpus:
    """The default offline corpus: the Python standard library's sources."""
    return prepare_corpus("stdlib", stdlib_documents, opts)


def build_debian(opts: CorpusOptions) -> PreparedCorpus:
    return prepare_corpus("debian", lambda cap: debian_documents(cap, opts.system_root), opts)


def build_enwik8(opts: CorpusOptions) -> PreparedCorpus:
    if len(opts.urls) > 1:
        raise CorpusUnavailable("corpus 'enwik8' takes at most one --url (the enwik8.zip to fetch)")
    url = opts.urls[0] if opts.urls else ENWIK8_URL
    raw = os.path.join(opts.data_dir, "enwik8", "raw")
    return prepare_corpus("enwik8", lambda cap: enwik8_documents(cap, raw, url, opts.timeout, opts.progress), opts)


def build_pile(opts: CorpusOptions) -> PreparedCorpus:
    raw = os.path.join(opts.data_dir, "pile", "raw")
    return prepare_corpus("pile", lambda cap: pile_documents(cap, raw, list(opts.urls), opts.timeout, opts.progress),
                          opts)


CORPORA: dict[str, Callable[[CorpusOptions], PreparedCorpus]] = {
    "stdlib": build_stdlib,
    "debian": build_debian,
    "enwik8": build_enwik8,
    "pile": build_pile,
}

__all__ = ["CORPORA", "CorpusOptions", "CorpusUnavailable", "PreparedCorpus", "prepare_corpus"]


def write_char_dataset(prefix: str, packages: tuple[str, ...] = ("json", "email")) -> str:
    """A small char-level dataset (about 0.3M tokens) of stdlib packages' sources, one document a
    file, for smoke tests and benchmarks that need real text but no tokenizer file."""
    import sysconfig
    from pathlib import Path

    import numpy as np

    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("CharLevelTokenizer")
    builder = MMapIndexedDatasetBuilder(prefix, np.uint16)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in packages:
        for path in sorted((stdlib / package).glob("*.py")):
            builder.add_document(tok.tokenize(path.read_text()) + [tok.eod])
    builder.finalize()
    return prefix
