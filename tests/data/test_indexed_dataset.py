"""The mmap indexed format: byte-exact output, round trips and the validation messages."""

import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
)


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
