"""merge_datasets.py (byte-exact concatenation) and inspect_dataset.py (counts, sample, checks)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    index_file_path,
    merge_indexed_datasets,
    write_index,
)
from megatron.data.token_ids import check_token_ids
from megatron.tokenizer import build_tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))


def run(tool, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools/datasets", tool), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def build(prefix, docs, dtype=np.uint16):
    with MMapIndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)
    return str(prefix)


@pytest.fixture
def three(tmp_path):
    a = build(tmp_path / "a", [[1, 2, 3], [4], [5, 6]])
    b = build(tmp_path / "b", [[7, 8, 9, 10]])
    # c: 3 sequences forming 2 documents (doc_idx 0, 2, 3), written by hand.
    c = str(tmp_path / "c")
    np.array([11, 12, 13, 14, 15, 16, 17, 18, 19], dtype=np.uint16).tofile(c + ".bin")
    write_index(c + ".idx", np.dtype(np.uint16), np.array([3, 2, 4]), np.array([0, 6, 10]), np.array([0, 2, 3]))
    return tmp_path, [a, b, c]


def test_merge_is_byte_exact(three):
    tmp, prefixes = three
    res = run("merge_datasets.py", "--input", *prefixes, "--output-prefix", str(tmp / "out" / "m"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{tmp}/out/m: merged 3 datasets: sequences=7 documents=6 tokens=19 dtype=uint16"
    m = MMapIndexedDataset(str(tmp / "out" / "m"))
    assert open(tmp / "out" / "m.bin", "rb").read() == b"".join(open(p + ".bin", "rb").read() for p in prefixes)
    assert m.sizes.tolist() == [3, 1, 2, 4, 3, 2, 4]
    assert m.pointers.tolist() == [0, 6, 8, 12, 20, 26, 30]
    assert m.doc_idx.tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert np.concatenate(m[:]).tolist() == list(range(1, 20))
    # A directory input takes its datasets in name order: same result.
    os.makedirs(tmp / "dir")
    for name, p in zip("xyz", prefixes):
        for ext in (".bin", ".idx"):
            os.link(p + ext, tmp / "dir" / (name + ext))
    assert run("merge_datasets.py", "--input", str(tmp / "dir"), "--output-prefix", str(tmp / "m2"),
               "--no-progress").returncode == 0
    assert open(tmp / "m2.idx", "rb").read() == open(tmp / "out" / "m.idx", "rb").read()


def test_merge_errors(three, tmp_path):
    tmp, prefixes = three
    wide = build(tmp_path / "wide", [[1, 2]], dtype=np.int32)
    res = run("merge_datasets.py", "--input", prefixes[0], wide, "--output-prefix", str(tmp / "bad"))
    assert res.returncode == 1
    assert f"error: {wide}.idx: token dtype int32 differs from uint16 of {prefixes[0]}.idx" in res.stderr
    assert not os.path.exists(tmp / "bad.bin")
    with pytest.raises(ValueError, match="is also an input"):
        merge_indexed_datasets(prefixes, prefixes[1])


def test_inspect_counts_and_decoded_sample(tmp_path):
    tok = build_tokenizer("CharLevelTokenizer")
    prefix = build(tmp_path / "chars", [tok.tokenize("hello world") + [tok.eod], tok.tokenize("ab") + [tok.eod]])
    res = run("inspect_dataset.py", prefix, "--tokenizer-type", "CharLevelTokenizer", "--sample", "1", "5",
              "--max-tokens", "4", "--check")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"prefix: {prefix}", "dtype: uint16", "sequences: 2", "documents: 2", "tokens: 15", ".bin bytes: 30",
        "tokens per sequence: min 3, mean 7.5, max 12",
        "sequence 1: 3 tokens; first 3: [97, 98, 256]", "decoded: 'ab<|endoftext|>'",
        "sequence 5: out of range for 2 sequences",
        "format check: ok (all tokens scanned)",
    ]


def test_inspect_fails_on_corrupt_files(tmp_path):
    prefix = build(tmp_path / "d", [[1, 2, 3], [300, 5]])
    # Token 300 is outside the char-level vocabulary of 257. --check scans afresh, even where
    # training's cache of the scan (made stale here by hand, with the right stamp) says otherwise.
    check_token_ids(MMapIndexedDataset(prefix), 301)
    cache = json.loads(open(prefix + ".idx.tokenids.json").read())
    cache["range"]["max_id"] = 5
    open(prefix + ".idx.tokenids.json", "w").write(json.dumps(cache))
    res = run("inspect_dataset.py", prefix, "--tokenizer-type", "CharLevelTokenizer", "--check")
    assert res.returncode == 1
    assert res.stderr == (f"format check failed: {prefix}.bin: document 1 holds token id 300, outside the "
                          "tokenizer's 257 ids (made with another tokenizer?)\n")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(7)
    res = run("inspect_dataset.py", prefix)
    assert res.returncode == 1
    assert f"format check failed: {prefix}.bin: .bin is 7 bytes but the index needs 10 (truncated copy?)" in res.stderr
    with open(index_file_path(prefix), "r+b") as f:
        f.write(b"NOTMAGIC!")
    res = run("inspect_dataset.py", prefix + ".idx")
    assert res.returncode == 1 and f"{prefix}.idx: bad magic b'NOTMAGIC!'" in res.stderr
    # Overlapping documents (pointer 2 of 2 falls inside document 0): refused on open.
    write_index(prefix + ".idx", np.dtype(np.uint16), np.array([3, 2]), np.array([0, 2]), np.array([0, 1, 2]))
    with open(prefix + ".bin", "wb") as f:
        f.write(bytes(10))
    res = run("inspect_dataset.py", prefix)
    assert res.returncode == 1
    assert res.stderr == (f"format check failed: {prefix}.idx: documents 0 and 1 overlap in {prefix}.bin (document 1 "
                          "starts at byte 2, before document 0 ends at byte 6); the index is corrupt, rebuild it "
                          "with tools/datasets/preprocess_data.py\n")
