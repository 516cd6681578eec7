"""Streaming from raw shards equals preprocessing then reading in file order; resume is exact."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from megatron.data.datasets import build_streaming_datasets
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.loader import micro_batches
from megatron.data.streaming import COUNTS_FILE, StreamingDataset
from megatron.tokenizer.train import train_bpe

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
_SRC = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py")).read()
DOCS = [_SRC[i * 300:(i + 1) * 300 - (i % 7) * 20] for i in range(60)]
L = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    vocab = str(tmp / "tok.json")
    train_bpe(DOCS, 400, vocab)
    cctx = zstandard.ZstdCompressor()
    lines = [json.dumps({"text": d}) for d in DOCS[:30]]
    lines[3] = "{broken"  # a bad line and an empty document: both skipped by both paths
    lines[7] = json.dumps({"text": ""})
    with open(tmp / "a.jsonl.zst", "wb") as f:  # two zstd frames
        f.write(cctx.compress(("\n".join(lines[:12]) + "\n").encode()))
        f.write(cctx.compress(("\n".join(lines[12:]) + "\n").encode()))
    (tmp / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[30:59]) + "\n\n")
    (tmp / "c.txt").write_text(DOCS[59])
    files = [str(tmp / n) for n in ("a.jsonl.zst", "b.jsonl", "c.txt")]
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools/datasets/preprocess_data.py"),
                          "--input", ",".join(files), "--tokenizer-type", "HFTokenizer", "--vocab-file", vocab,
                          "--append-eod", "--output-prefix", str(tmp / "pre")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    ds = MMapIndexedDataset(str(tmp / "pre_text_document"))
    assert len(ds) == 58
    stream = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    return tmp, files, vocab, stream


def take(it, n):
    return [next(it) for _ in range(n)]


def test_stream_equals_preprocessed_in_file_order(corpus):
    tmp, files, vocab, stream = corpus
    # Compared: every full sample of the first epoch. Sample k of the stream must equal tokens
    # [k*L, k*L + L] of the preprocessed documents concatenated in file order (no shuffling).
    full = (len(stream) - 1) // L
    assert full > 100
    ds = StreamingDataset(files, ("HFTokenizer", vocab, None), L, seed=None, workers=2, batch_lines=5,
                          cache_dir=str(tmp / "c1"))
    got = take(ds.iter_samples(0), full + 3)
    for k in range(full):
        assert got[k].dtype == np.int64 and np.array_equal(got[k], stream[k * L:k * L + L + 1]), k
    # The stream runs on into the next epoch without a break: sample `full` straddles it.
    tail = stream[full * L:]
    assert np.array_equal(got[full], np.concatenate([tail, stream[:L + 1 - len(tail)]]))
    # Tokenizing inline gives the same samples as the worker pool.
    inline = StreamingDataset(files, ("HFTokenizer", vocab, None), L, workers=0, cache_dir=str(tmp / "c2"))
    assert all(np.array_equal(a, b) for a, b in zip(take(inline.iter_samples(0), full + 3), got))


def test_resume_serves_the_same_samples(corpus):
    tmp, files, vocab, stream = corpus
    cache = str(tmp / "c3")
    os.makedirs(cache)
    ds = StreamingDataset(files, ("HFTokenizer", vocab, None), L, seed=5, workers=1, cache_dir=cache)
    reference = take(ds.iter_samples(0), 700)  # about 2.5 epochs, files shuffled per epoch
    assert [os.path.basename(f) for f in ds.file_order(0)] != [os.path.basename(f) for f in ds.file_order(1)]
    for k in (1, 37, 250, 333, 600):
        resumed = take(ds.iter_samples(k), 50)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, reference[k:k + 50])), k
    # Whole-file token counts were learned; a fresh dataset resuming later skips those files unread.
    counts = json.loads(open(os.path.join(cache, COUNTS_FILE)).read())
    assert len(counts) == 3 and sum(counts.values()) == len(stream)
    fresh = StreamingDataset(files, ("HFTokenizer", vocab, None), L, seed=5, workers=0, cache_dir=cache)
    read = []
    original = fresh._file_chunks
    fresh._file_chunks = lambda path, pool: (read.append(path), original(path, pool))[1]
    resumed = take(fresh.iter_samples(600), 20)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, reference[600:620]))
    # Expected reads: only the files overlapping stream tokens [600 L, 620 L], found from the counts.
    per_file = {k.split("|")[0]: v for k, v in counts.items()}
    expected, pos, epoch = [], 0, 0
    while pos <= 620 * L:
        for path in ds.file_order(epoch):
            if pos + per_file[path] > 600 * L and pos <= 620 * L:
                expected.append(path)
            pos += per_file[path]
        epoch += 1
    assert read == expected and 1 <= len(read) < 3


def test_loader_slices_the_stream_like_random_access(corpus):
    tmp, files, vocab, stream = corpus
    ds = StreamingDataset(files, ("HFTokenizer", vocab, None), L, workers=0, cache_dir=str(tmp / "c4"))
    as_list = take(ds.iter_samples(0), 200)
    micro, dp, consumed = 3, 2, 24
    for rank in range(dp):
        streamed = micro_batches(ds, consumed, micro, dp, rank)
        indexed = micro_batches(as_list, consumed, micro, dp, rank)
        for _ in range(5):
            (a, la), (b, lb) = next(streamed), next(indexed)
            assert a.shape == (3, L) and a.equal(b) and la.equal(lb)


def test_build_streaming_datasets_and_errors(corpus, tmp_path):
    tmp, files, vocab, stream = corpus
    train, valid, test = build_streaming_datasets([str(tmp / "*.jsonl*")], [files[2]], None,
                                                  ("HFTokenizer", vocab, None), L, seed=3, workers=0,
                                                  cache_dir=str(tmp_path))
    assert train.files == files[:2] and train.seed == 3 and valid.seed is None and test is None
    with pytest.raises(FileNotFoundError, match="streaming data path '.*nothing\\*' matches no file"):
        StreamingDataset([str(tmp / "nothing*")], ("HFTokenizer", vocab, None), L)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    empty = StreamingDataset([str(tmp_path / "empty.jsonl")], ("HFTokenizer", vocab, None), L, workers=0)
    with pytest.raises(ValueError, match="hold no documents under key 'text'"):
        next(empty.iter_samples(0))
    with pytest.raises(ValueError, match="streaming needs train_data_paths"):
        build_streaming_datasets([], None, None, ("HFTokenizer", vocab, None), L, 0, 0)
