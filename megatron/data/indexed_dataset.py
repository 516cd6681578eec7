"""The Megatron / GPT-NeoX "mmap" indexed dataset: PREFIX.bin + PREFIX.idx.

``PREFIX.bin`` holds every token array back to back; ``PREFIX.idx`` (little-endian) is

    magic b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | N u64 | D u64
    | sizes int32[N] | pointers int64[N] (byte offsets into .bin) | doc_idx int64[D]

Files written here are byte-compatible with GPT-NeoX's, so its preprocessed corpora (the Pile
shards) load unchanged. Reading is zero-copy: both files are memory-mapped and every item is a
read-only numpy view, so a multi-hundred-GB corpus costs only the pages actually touched. The
reader validates the header, the extents and that no two documents overlap on open, because a
truncated copy would otherwise surface as garbage tokens or a segfault hours into a run.
``megatron.data.token_ids`` checks the token ids against a tokenizer's vocabulary.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any, Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D: 34 bytes
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, corrupt or inconsistent; the message names the file."""


def distributed() -> Any:
    """torch.distributed if a process group is up, else None; torch is not imported just to find out."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def best_dtype(vocab_size: int) -> np.dtype:
    """Smallest token dtype used by GPT-NeoX: uint16 below 65,500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def write_index(path: str, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray) -> None:
    """Write a .idx file (the layout in the module docstring)."""
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype)], len(sizes), len(doc_idx)))
        f.write(np.asarray(sizes).astype("<i4").tobytes())
        f.write(np.asarray(pointers).astype("<i8").tobytes())
        f.write(np.asarray(doc_idx).astype("<i8").tobytes())


class MMapIndexedDatasetBuilder:
    """Streams documents to ``PREFIX.bin`` as they are added; ``finalize`` writes ``PREFIX.idx``.

    Tokens go to ``PREFIX.bin.tmp`` and both files get their final names only in ``finalize``,
    so an interrupted run never leaves a pair that looks valid. Only the per-document sizes stay
    in memory (4 bytes each). Usable as a context manager: finalize on success, clean up on error.
    """

    def __init__(self, out_prefix: str, dtype: np.dtype | type) -> None:
        self.out_prefix = out_prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {self.dtype}; use one of {sorted(map(str, CODE_OF_DTYPE))}")
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self._range: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._range = None
        self._tmp_bin = data_file_path(out_prefix) + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
        self._bin = open(self._tmp_bin, "wb")
        self._sizes = np.empty(1024, dtype=np.int32)
        self._count = 0
        self.num_tokens = 0

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one document (one sequence in the index)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"add_document expects a 1-D token array, got shape {arr.shape}")
        if arr.size and self._range is not None:
            # A silent wrap-around (e.g. id 70000 stored as uint16) would corrupt training data.
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._range[0] or hi > self._range[1]:
                raise ValueError(
                    f"token ids span {lo}..{hi}, outside {self.dtype} ({self._range[0]}..{self._range[1]})"
                )
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"document of {arr.size} tokens exceeds the int32 size field")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        if self._count == len(self._sizes):
            self._sizes = np.resize(self._sizes, 2 * len(self._sizes))
        self._sizes[self._count] = arr.size
        self._count += 1
        self.num_tokens += int(arr.size)

    def finalize(self) -> None:
        """Write ``PREFIX.idx`` and move ``PREFIX.bin`` into place."""
        self._bin.close()
        sizes = self._sizes[: self._count]
        pointers = np.zeros(self._count, dtype=np.int64)
        if self._count > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        # One sequence per document: doc_idx is 0, 1, ..., N.
        doc_idx = np.arange(self._count + 1, dtype=np.int64)
        idx_path = index_file_path(self.out_prefix)
        write_index(idx_path + ".tmp", self.dtype, sizes, pointers, doc_idx)
        os.replace(self._tmp_bin, data_file_path(self.out_prefix))
        os.replace(idx_path + ".tmp", idx_path)

    def abort(self) -> None:
        """Drop the partial output."""
        self._bin.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def __enter__(self) -> "MMapIndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _map(path: str) -> np.ndarray:
    # np.memmap refuses empty files; an empty .bin (zero documents) is legitimate.
    if os.path.getsize(path) == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _check_layout(sizes: np.ndarray, pointers: np.ndarray, dtype: np.dtype, idx_path: str, bin_path: str) -> int:
    """Raise IndexedDatasetError unless every document starts on a token boundary and no two
    share bytes of .bin; return the bytes of .bin the index needs.

    Overlapping documents train on the same tokens twice without any other symptom, so they
    are refused on open. Vectorised over the index: about 0.1 s per 10^7 documents for the
    layout writers produce (documents back to back, in order).
    """
    # Token sizes are powers of two, so a bit mask finds a pointer inside a token.
    misaligned = pointers & (dtype.itemsize - 1)
    if np.any(misaligned):
        i = int(np.flatnonzero(misaligned)[0])
        raise IndexedDatasetError(
            f"{idx_path}: document {i} starts at byte {int(pointers[i])}, inside a {dtype.itemsize}-byte "
            f"{dtype} token (corrupt index)"
        )
    ends = pointers + sizes.astype(np.int64) * dtype.itemsize
    # Each document starting where or after the previous one ends: no overlap, and the last ends
    # furthest. The common case, decided with one comparison.
    if bool(np.all(pointers[1:] >= ends[:-1])):
        return int(ends[-1])
    order = None if bool(np.all(pointers[1:] >= pointers[:-1])) else np.argsort(pointers, kind="stable")
    if order is not None:
        pointers, sizes, ends = pointers[order], sizes[order], ends[order]
    # Furthest byte covered by the documents before each one; an empty document owns no bytes.
    reach = np.maximum.accumulate(ends)
    clash = np.flatnonzero((pointers[1:] < reach[:-1]) & (sizes[1:] > 0))
    if len(clash):
        k = int(clash[0]) + 1
        earlier = int(np.argmax(ends[:k] > pointers[k]))
        start, end = int(pointers[k]), int(ends[earlier])
        i, j = (earlier, k) if order is None else (int(order[earlier]), int(order[k]))
        raise IndexedDatasetError(
            f"{idx_path}: documents {i} and {j} overlap in {bin_path} (document {j} starts at byte {start}, "
            f"before document {i} ends at byte {end}); the index is corrupt, "
            "rebuild it with tools/datasets/preprocess_data.py"
        )
    return int(reach[-1])


class MMapIndexedDataset:
    """Read-only, zero-copy view of a PREFIX.bin / PREFIX.idx pair."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: no such file (a dataset needs both PREFIX.idx and PREFIX.bin)")
        idx = _map(idx_path)
        if len(idx) < HEADER.size:
            raise IndexedDatasetError(
                f"{idx_path}: .idx is {len(idx)} bytes, shorter than the {HEADER.size}-byte header"
            )
        magic, version, code, n, d = HEADER.unpack(bytes(idx[: HEADER.size]))
        if magic != MAGIC:
            raise IndexedDatasetError(f"{idx_path}: bad magic {magic!r} (expected {MAGIC!r})")
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (valid: {sorted(DTYPE_CODES)})")
        need = HEADER.size + 12 * n + 8 * d
        if need != len(idx):
            raise IndexedDatasetError(
                f"{idx_path}: .idx is {len(idx)} bytes but N={n} sequences and D={d} doc_idx entries need {need}"
            )
        self._dtype = np.dtype(DTYPE_CODES[code])
        self._sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=HEADER.size)
        self._pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=HEADER.size + 4 * n)
        self._doc_idx = np.frombuffer(idx, dtype="<i8", count=d, offset=HEADER.size + 12 * n)

        bin_buf = _map(bin_path)
        if n:
            if int(self._sizes.min()) < 0 or int(self._pointers.min()) < 0:
                raise IndexedDatasetError(f"{idx_path}: negative size or pointer in the index")
            need_bin = _check_layout(self._sizes, self._pointers, self._dtype, idx_path, bin_path)
            if need_bin > len(bin_buf):
                raise IndexedDatasetError(
                    f"{bin_path}: .bin is {len(bin_buf)} bytes but the index needs {need_bin} (truncated copy?)"
                )
        if d and (self._doc_idx[0] != 0 or self._doc_idx[-1] != n or np.any(np.diff(self._doc_idx) < 0)):
            raise IndexedDatasetError(f"{idx_path}: doc_idx must rise from 0 to N={n}")
        self._idx_buf, self._bin_buf = idx, bin_buf

    # Pickle by path: DataLoader workers re-map the files instead of copying buffers.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (a read-only view)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        size = int(self._sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of {size} tokens")
        start = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin_buf, dtype=self._dtype, count=length, offset=start)

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def merge_indexed_datasets(prefixes: Sequence[str], out_prefix: str, progress: bool = False) -> MMapIndexedDataset:
    """Concatenate datasets into ``out_prefix``: the .bin is the inputs' .bin files back to back,
    byte for byte, and the index is theirs shifted by what came before.

    Pointers are shifted by the preceding .bin sizes rather than recomputed from the sizes, so an
    input with unused bytes in its .bin still merges correctly. An input without doc_idx entries
    counts each sequence as one document (what the builder writes). Inputs must share a dtype.
    """
    import shutil

    if not prefixes:
        raise ValueError("merge: no input datasets")
    inputs = [MMapIndexedDataset(p) for p in prefixes]
    dtype = inputs[0].dtype
    for ds in inputs[1:]:
        if ds.dtype != dtype:
            raise IndexedDatasetError(
                f"{index_file_path(ds.prefix)}: token dtype {ds.dtype} differs from {dtype} of "
                f"{index_file_path(inputs[0].prefix)}; merge needs one dtype"
            )
    if any(os.path.abspath(out_prefix) == os.path.abspath(p) for p in prefixes):
        raise ValueError(f"merge: the output {out_prefix} is also an input")
    sizes, pointers, doc_idx = [], [], [np.zeros(1, dtype=np.int64)]
    byte_offset, seq_offset = 0, 0
    bin_path = data_file_path(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    total = sum(os.path.getsize(data_file_path(p)) for p in prefixes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging")
    try:
        with open(bin_path + ".tmp", "wb") as out:
            for ds in inputs:
                with open(data_file_path(ds.prefix), "rb") as src:
                    nbytes = os.path.getsize(data_file_path(ds.prefix))
                    shutil.copyfileobj(src, out, 16 << 20)
                sizes.append(np.asarray(ds.sizes))
                pointers.append(np.asarray(ds.pointers) + byte_offset)
                docs = np.asarray(ds.doc_idx) if len(ds.doc_idx) else np.arange(len(ds) + 1, dtype=np.int64)
                doc_idx.append(docs[1:] + seq_offset)
                byte_offset += nbytes
                seq_offset += len(ds)
                if bar is not None:
                    bar.update(nbytes)
        write_index(index_file_path(out_prefix) + ".tmp", dtype, np.concatenate(sizes), np.concatenate(pointers),
                    np.concatenate(doc_idx))
    except BaseException:
        for path in (bin_path + ".tmp", index_file_path(out_prefix) + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        if bar is not None:
            bar.close()
    os.replace(bin_path + ".tmp", bin_path)
    os.replace(index_file_path(out_prefix) + ".tmp", index_file_path(out_prefix))
    return MMapIndexedDataset(out_prefix)
