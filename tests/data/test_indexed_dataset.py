"""The mmap indexed format: byte-exact output, round trips, the validation messages and the
token-id check training runs on every dataset."""

import json
import os
import struct

import numpy as np
import pytest

from megatron.data import token_ids
from megatron.data.datasets import build_datasets
from megatron.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
    write_index,
)
from megatron.data.token_ids import TokenIdRange, check_token_ids, scan_token_ids


def write(prefix, docs, dtype):
    builder = MMapIndexedDatasetBuilder(str(prefix), dtype)
    for d in docs:
        builder.add_document(d)
    builder.finalize()
    return str(prefix)


def test_best_dtype_threshold():
    assert best_dtype(50277) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    docs = [[1, 2, 3], [], [65000, 7], list(range(100))]
    if dtype == np.int32:
        docs[2] = [100_000, 7]
    ds = MMapIndexedDataset(write(tmp_path / "rt", docs, dtype))
    assert len(ds) == 4
    assert ds.dtype == np.dtype(dtype)
    assert ds.sizes.tolist() == [3, 0, 2, 100]
    isz = np.dtype(dtype).itemsize
    assert ds.pointers.tolist() == [0, 3 * isz, 3 * isz, 5 * isz]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds[-1].tolist() == list(range(100))
    assert ds.get(3, offset=10, length=5).tolist() == [10, 11, 12, 13, 14]
    assert ds.get(3, offset=98).tolist() == [98, 99]
    assert [a.tolist() for a in ds[0:3:2]] == [[1, 2, 3], docs[2]]
    # Zero copy: items are read-only views of the mapped file.
    assert not ds[0].flags.writeable
    with pytest.raises(IndexError, match="sequence 4 out of range for 4"):
        ds[4]
    with pytest.raises(IndexError, match="tokens 2:4 out of range for sequence 0 of 3"):
        ds.get(0, offset=2, length=2)


def test_idx_bytes_match_the_format(tmp_path):
    prefix = write(tmp_path / "tiny", [np.array([5, 6, 7]), np.array([9])], np.uint16)
    expected = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<Q", 2)  # N
        + struct.pack("<Q", 3)  # D
        + struct.pack("<2i", 3, 1)  # sizes
        + struct.pack("<2q", 0, 6)  # byte pointers
        + struct.pack("<3q", 0, 1, 2)  # doc_idx
    )
    assert open(prefix + ".idx", "rb").read() == expected
    assert len(expected) == 34 + 12 * 2 + 8 * 3
    assert open(prefix + ".bin", "rb").read() == struct.pack("<4H", 5, 6, 7, 9)


def test_reads_a_hand_written_int32_pair(tmp_path):
    prefix = str(tmp_path / "hand")
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2, 3))
        f.write(struct.pack("<2i2q3q", 2, 2, 0, 8, 0, 1, 2))
    with open(prefix + ".bin", "wb") as f:
        f.write(struct.pack("<4i", 70000, -1, 3, 4))
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.int32
    assert [ds[0].tolist(), ds[1].tolist()] == [[70000, -1], [3, 4]]


def test_builder_rejects_ids_outside_dtype(tmp_path):
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "x"), np.uint16)
    with pytest.raises(ValueError, match=r"token ids span 0..70000, outside uint16 \(0..65535\)"):
        builder.add_document(np.array([0, 70000]))
    builder.abort()
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.tmp").exists()


def test_builder_context_manager_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with MMapIndexedDatasetBuilder(str(tmp_path / "y"), np.uint16) as b:
            b.add_document([1, 2])
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "data_text_document", [[1, 2, 3, 4], [5, 6]], np.uint16)


def test_bad_magic(good):
    raw = bytearray(open(good + ".idx", "rb").read())
    raw[:9] = b"NOTANIDX\x00"
    open(good + ".idx", "wb").write(bytes(raw))
    with pytest.raises(IndexedDatasetError) as err:
        MMapIndexedDataset(good)
    assert str(err.value) == (
        f"{good}.idx: bad magic b'NOTANIDX\\x00' (expected b'MMIDIDX\\x00\\x00')"
    )


def test_bad_version_and_dtype(good):
    raw = bytearray(open(good + ".idx", "rb").read())
    raw[9:17] = struct.pack("<Q", 2)
    open(good + ".idx", "wb").write(bytes(raw))
    with pytest.raises(IndexedDatasetError, match=r"data_text_document.idx: unsupported version 2 \(expected 1\)"):
        MMapIndexedDataset(good)
    raw[9:17] = struct.pack("<Q", 1)
    raw[17] = 9
    open(good + ".idx", "wb").write(bytes(raw))
    with pytest.raises(IndexedDatasetError, match="data_text_document.idx: unknown dtype code 9"):
        MMapIndexedDataset(good)


def test_truncated_bin(good):
    raw = open(good + ".bin", "rb").read()
    assert len(raw) == 12
    open(good + ".bin", "wb").write(raw[:10])
    with pytest.raises(IndexedDatasetError) as err:
        MMapIndexedDataset(good)
    assert str(err.value) == f"{good}.bin: .bin is 10 bytes but the index needs 12 (truncated copy?)"
    assert isinstance(err.value, ValueError)


def test_truncated_idx(good):
    raw = open(good + ".idx", "rb").read()
    assert len(raw) == 34 + 24 + 24
    open(good + ".idx", "wb").write(raw[:70])
    with pytest.raises(IndexedDatasetError) as err:
        MMapIndexedDataset(good)
    assert str(err.value) == (
        f"{good}.idx: .idx is 70 bytes but N=2 sequences and D=3 doc_idx entries need 82"
    )
    open(good + ".idx", "wb").write(raw[:20])
    expected = "data_text_document.idx: .idx is 20 bytes, shorter than the 34-byte header"
    with pytest.raises(IndexedDatasetError, match=expected):
        MMapIndexedDataset(good)


def test_missing_files(tmp_path, good):
    missing = str(tmp_path / "nothing")
    with pytest.raises(IndexedDatasetError, match="nothing.idx: no such file"):
        MMapIndexedDataset(missing)
    (tmp_path / "data_text_document.bin").unlink()
    with pytest.raises(IndexedDatasetError, match="data_text_document.bin: no such file"):
        MMapIndexedDataset(good)


def test_pickles_by_path(good):
    import pickle

    ds = pickle.loads(pickle.dumps(MMapIndexedDataset(good)))
    assert ds[1].tolist() == [5, 6]


def hand_written(prefix, tokens, sizes, pointers, dtype=np.uint16):
    """A pair with the given layout, as no builder would write it."""
    np.asarray(tokens, dtype=dtype).tofile(str(prefix) + ".bin")
    write_index(str(prefix) + ".idx", np.dtype(dtype), np.array(sizes), np.array(pointers),
                np.arange(len(sizes) + 1))
    return str(prefix)


def open_error(prefix) -> str:
    with pytest.raises(IndexedDatasetError) as err:
        MMapIndexedDataset(prefix)
    return str(err.value)


def test_overlapping_documents_are_refused_on_open(tmp_path):
    # In order: document 1 (bytes 4..8) starts inside document 0 (bytes 0..6).
    p = hand_written(tmp_path / "o", range(5), [3, 2], [0, 4])
    assert open_error(p) == (
        f"{p}.idx: documents 0 and 1 overlap in {p}.bin (document 1 starts at byte 4, before document 0 "
        "ends at byte 6); the index is corrupt, rebuild it with tools/datasets/preprocess_data.py"
    )
    # Out of order: document 2 (bytes 4..8) starts inside document 1 (bytes 0..6).
    p = hand_written(tmp_path / "u", range(5), [2, 3, 2], [6, 0, 4])
    assert open_error(p).startswith(f"{p}.idx: documents 1 and 2 overlap in {p}.bin (document 2 starts at byte 4, "
                                    "before document 1 ends at byte 6)")
    p = hand_written(tmp_path / "a", range(5), [2, 2], [0, 3])
    assert open_error(p) == f"{p}.idx: document 1 starts at byte 3, inside a 2-byte uint16 token (corrupt index)"


def test_layouts_that_share_no_bytes_open(tmp_path):
    # Out of order, with a gap (99), and an empty document pointing inside another (it owns no bytes).
    ds = MMapIndexedDataset(hand_written(tmp_path / "ok", [5, 6, 7, 99, 0, 8, 9], [2, 3, 0, 1], [10, 0, 2, 8]))
    assert [ds[i].tolist() for i in range(4)] == [[8, 9], [5, 6, 7], [], [0]]
    assert scan_token_ids(ds) == TokenIdRange(0, 3, 9, 0)


def test_scan_reads_only_documents_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(token_ids, "_SCAN_TOKENS", 4)  # many batches, documents longer than one
    rng = np.random.default_rng(0)
    docs = [rng.integers(-1000, 1000, size=int(n)) for n in rng.integers(0, 9, size=40)]
    ds = MMapIndexedDataset(write(tmp_path / "many", docs, np.int32))
    lo = min(int(d.min()) for d in docs if len(d))
    hi = max(int(d.max()) for d in docs if len(d))
    first_with = lambda v: next(i for i, d in enumerate(docs) if v in d)  # noqa: E731
    assert scan_token_ids(ds) == TokenIdRange(lo, first_with(lo), hi, first_with(hi))
    # Bytes of .bin outside every document (here 60000 and 1) are not tokens.
    gaps = MMapIndexedDataset(hand_written(tmp_path / "gaps", [7, 60000, 3, 4, 1], [1, 2], [0, 4]))
    assert scan_token_ids(gaps) == TokenIdRange(3, 1, 7, 0)
    assert scan_token_ids(MMapIndexedDataset(write(tmp_path / "empty", [[], []], np.uint16))) is None


def test_token_ids_outside_the_vocabulary(tmp_path):
    p = write(tmp_path / "x_text_document", [[1, 2], [], [50300, 7], [50276]], np.uint16)
    with pytest.raises(IndexedDatasetError) as err:
        check_token_ids(MMapIndexedDataset(p), 50277)
    assert str(err.value) == (
        f"{p}.bin: document 2 holds token id 50300, outside the tokenizer's 50277 ids (made with another tokenizer?)"
    )
    check_token_ids(MMapIndexedDataset(p), 50301)
    neg = write(tmp_path / "neg", [[3, 4], [5, -2]], np.int32)
    with pytest.raises(IndexedDatasetError) as err:
        check_token_ids(MMapIndexedDataset(neg), None)
    assert str(err.value) == f"{neg}.bin: document 1 holds token id -2, negative (corrupt .bin?)"


def test_the_scan_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    p = write(tmp_path / "c", [[1, 2], [300]], np.uint16)
    check_token_ids(MMapIndexedDataset(p), 301)
    cache = json.loads(open(p + ".idx.tokenids.json").read())
    assert cache["range"] == {"min_id": 1, "min_document": 0, "max_id": 300, "max_document": 1}
    scans = []
    real_scan = token_ids.scan_token_ids
    monkeypatch.setattr(token_ids, "scan_token_ids", lambda ds: scans.append(ds.prefix) or real_scan(ds))
    check_token_ids(MMapIndexedDataset(p), 301)
    assert scans == []
    # Same size, new tokens and mtime: the cache no longer applies.
    np.array([1, 2, 400], dtype=np.uint16).tofile(p + ".bin")
    os.utime(p + ".bin", ns=(1, 1))
    with pytest.raises(IndexedDatasetError, match="document 1 holds token id 400, outside the tokenizer's 301 ids"):
        check_token_ids(MMapIndexedDataset(p), 301)
    assert scans == [p]
    # A cache that cannot be written (read-only directory) is skipped: the answer is the same.
    monkeypatch.setattr(token_ids, "token_id_cache_path", lambda prefix: str(tmp_path / "ro" / "x.json"))
    check_token_ids(MMapIndexedDataset(p), 401)
    assert scans == [p, p] and not (tmp_path / "ro").exists()


def test_ranks_other_than_0_read_rank_0s_scan(tmp_path, monkeypatch):
    p = write(tmp_path / "d", [[1, 2], [300]], np.uint16)
    events = []

    class FakeDist:
        def __init__(self, rank):
            self.rank = rank

        def get_rank(self):
            return self.rank

        def barrier(self):
            events.append(f"barrier {self.rank}")

    real_scan = token_ids.scan_token_ids
    monkeypatch.setattr(token_ids, "scan_token_ids", lambda ds: events.append("scan") or real_scan(ds))
    monkeypatch.setattr(token_ids, "distributed", lambda: FakeDist(0))
    check_token_ids(MMapIndexedDataset(p), 301)
    monkeypatch.setattr(token_ids, "distributed", lambda: FakeDist(1))
    with pytest.raises(IndexedDatasetError, match="document 1 holds token id 300, outside the tokenizer's 300 ids"):
        check_token_ids(MMapIndexedDataset(p), 300)
    assert events == ["scan", "barrier 0", "barrier 1"]


def test_training_datasets_check_the_token_ids(tmp_path):
    p = write(tmp_path / "t_text_document", [list(range(40)), [1, 2, 999]] * 5, np.uint16)
    expected = f"{p}.bin: document 1 holds token id 999, outside the tokenizer's 257 ids (made with another tokenizer?)"
    for data_path, train_paths in ((p, None), (None, [p]), (None, [p, p])):
        with pytest.raises(IndexedDatasetError) as err:
            build_datasets(data_path, train_paths, None, None, None, None, None, "9,1", (10, 0, 0), 8, 1,
                           vocab_size=257)
        assert str(err.value) == expected
    train, _, _ = build_datasets(p, None, None, None, None, None, None, "9,1", (10, 0, 0), 8, 1, vocab_size=1000)
    assert len(train) >= 10
