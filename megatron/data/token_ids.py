"""Token ids of an indexed dataset against a tokenizer's vocabulary, scanned once per dataset.

``check_token_ids`` scans every document's ids (cached beside the index until either file
changes) and names the .bin, the document and the id when one is negative or outside the
vocabulary; training runs it on every dataset it opens, ``inspect_dataset.py --check`` rescans.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

from megatron.data.indexed_dataset import (IndexedDatasetError, MMapIndexedDataset, data_file_path, distributed,
                                           index_file_path)

# Tokens reduced per batch when scanning a .bin for its token ids (bounded memory).
_SCAN_TOKENS = 1 << 24


@dataclass(frozen=True)
class TokenIdRange:
    """The smallest and largest token id in a dataset's documents, each with the first document
    (in .bin order) that holds it."""

    min_id: int | float  # float for the float32/float64 token dtypes
    min_document: int
    max_id: int | float
    max_document: int


def token_id_cache_path(prefix: str) -> str:
    return prefix + ".idx.tokenids.json"


def scan_token_ids(ds: MMapIndexedDataset) -> TokenIdRange | None:
    """Read every token of every document (not bytes of .bin outside them); None if there are none.

    Documents are taken in .bin order in batches of about ``_SCAN_TOKENS`` tokens, each reduced
    per document with one ``reduceat``, so memory stays bounded and the file is read once,
    front to back.
    """
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    documents = np.flatnonzero(sizes)
    if not len(documents):
        return None
    documents = documents[np.argsort(ds.pointers[documents], kind="stable")]
    starts = ds.pointers[documents] // ds.dtype.itemsize  # token offsets: the open checked alignment
    ends = starts + sizes[documents]  # increasing too: documents do not overlap (checked on open)
    tokens = np.frombuffer(ds._bin_buf, dtype=ds.dtype, count=len(ds._bin_buf) // ds.dtype.itemsize)
    lo, lo_doc, hi, hi_doc = None, 0, None, 0
    first = 0
    while first < len(documents):
        stop = max(first + 1, int(np.searchsorted(ends, starts[first] + _SCAN_TOKENS, side="right")))
        base = starts[first]
        part = tokens[base:ends[stop - 1]]
        # [start, end) of every document, interleaved: reduceat's even outputs are the documents,
        # its odd ones the gaps between them (ignored). The last end is the end of `part`.
        bounds = np.stack([starts[first:stop] - base, ends[first:stop] - base], axis=1).ravel()[:-1]
        mins = np.minimum.reduceat(part, bounds)[::2]
        maxs = np.maximum.reduceat(part, bounds)[::2]
        i, j = int(np.argmin(mins)), int(np.argmax(maxs))
        if lo is None or mins[i] < lo:
            lo, lo_doc = mins[i].item(), int(documents[first + i])
        if hi is None or maxs[j] > hi:
            hi, hi_doc = maxs[j].item(), int(documents[first + j])
        first = stop
    return TokenIdRange(lo, lo_doc, hi, hi_doc)


def _file_stamp(prefix: str) -> dict[str, int]:
    """What the cached scan depends on: a rewritten .bin or .idx changes a size or an mtime."""
    stamp = {}
    for name, path in (("bin", data_file_path(prefix)), ("idx", index_file_path(prefix))):
        st = os.stat(path)
        stamp[f"{name}_bytes"], stamp[f"{name}_mtime_ns"] = st.st_size, st.st_mtime_ns
    return stamp


def cached_token_ids(ds: MMapIndexedDataset, rescan: bool = False) -> TokenIdRange | None:
    """``scan_token_ids``, cached in ``PREFIX.idx.tokenids.json`` for as long as neither file changes.

    The cache is rewritten atomically; in a read-only directory it is skipped and every call
    scans. Under torch.distributed rank 0 scans while the others wait on a barrier and then read
    its cache (or scan themselves where they cannot see it), so every rank gets the same answer
    without all of them reading the whole .bin at once.
    """
    path, stamp = token_id_cache_path(ds.prefix), _file_stamp(ds.prefix)

    def load() -> tuple[bool, TokenIdRange | None]:
        """(whether the cache answers, its answer)."""
        try:
            with open(path) as f:
                cached = json.load(f)
            if cached["stamp"] != stamp:
                return False, None
            return True, None if cached["range"] is None else TokenIdRange(**cached["range"])
        except (OSError, ValueError, KeyError, TypeError):
            return False, None  # absent or unreadable: scan

    def scan_and_save() -> TokenIdRange | None:
        found = scan_token_ids(ds)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"stamp": stamp, "range": None if found is None else dataclasses.asdict(found)}, f)
            os.replace(tmp, path)  # readers never see a half-written file
        except OSError:
            pass  # a read-only data directory costs a scan per run, not a failed run
        return found

    dist = distributed()
    if dist is None or dist.get_rank() == 0:
        hit, found = (False, None) if rescan else load()
        if not hit:
            found = scan_and_save()
    if dist is not None:
        dist.barrier()
        if dist.get_rank() != 0:
            hit, found = load()
            if not hit:
                found = scan_token_ids(ds)
    return found


def check_token_ids(ds: MMapIndexedDataset, vocab_size: int | None, rescan: bool = False) -> None:
    """Raise IndexedDatasetError, naming the .bin, the document and the id, if a document holds a
    negative id or (given ``vocab_size``) one the tokenizer does not have: the embedding lookup
    would otherwise fail at the first step with a bare ``IndexError``. ``rescan`` ignores the
    cache (``inspect_dataset.py --check``)."""
    found = cached_token_ids(ds, rescan)
    if found is None:
        return
    bin_path = data_file_path(ds.prefix)
    if found.min_id < 0:
        raise IndexedDatasetError(
            f"{bin_path}: document {found.min_document} holds token id {found.min_id}, negative (corrupt .bin?)"
        )
    if vocab_size is not None and found.max_id >= vocab_size:
        raise IndexedDatasetError(
            f"{bin_path}: document {found.max_document} holds token id {found.max_id}, outside the tokenizer's "
            f"{vocab_size} ids (made with another tokenizer?)"
        )
