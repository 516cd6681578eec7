"""GPT samples: shape, one-token overlap, full coverage, order independent of num_samples."""

import os

import numpy as np
import pytest

from megatron.data.gpt_dataset import (
    GPTDataset,
    build_train_valid_test_datasets,
    parse_split,
    split_boundaries,
)
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder


def make_data(tmp_path, sizes):
    """Documents whose tokens are their global positions, so every token is unique."""
    prefix = str(tmp_path / "corpus_text_document")
    builder = MMapIndexedDatasetBuilder(prefix, np.int32)
    start = 0
    for n in sizes:
        builder.add_document(np.arange(start, start + n))
        start += n
    builder.finalize()
    return MMapIndexedDataset(prefix)


SIZES = [7, 0, 13, 1, 25, 4, 9, 16, 2, 4]  # 81 tokens; seq_length 8 -> exactly 10 samples/epoch


def test_sample_shape_overlap_and_coverage(tmp_path):
    indexed = make_data(tmp_path, SIZES)
    ds = GPTDataset("train", indexed, np.arange(len(SIZES)), 10, seq_length=8, seed=1)
    assert (ds.tokens_per_epoch, ds.samples_per_epoch, ds.num_epochs, len(ds)) == (81, 10, 1, 10)
    samples = [ds[i] for i in range(len(ds))]
    assert all(s.dtype == np.int64 and s.shape == (9,) for s in samples)
    # Undo the sample shuffle: in stream order, sample k ends with the token sample k+1 starts with.
    stream_order = [samples[j] for j in np.argsort(ds.shuffle_idx[0])]
    for a, b in zip(stream_order, stream_order[1:]):
        assert a[-1] == b[0]
    # The epoch's token stream is the documents in the epoch's order; all 81 tokens are used.
    stream = np.concatenate([indexed[int(d)] for d in ds.doc_idx[0]])
    rebuilt = np.concatenate([s[:-1] for s in stream_order] + [stream_order[-1][-1:]])
    assert rebuilt.tolist() == stream.tolist()
    assert sorted(rebuilt.tolist()) == list(range(81))
    # Samples are shuffled, documents too.
    assert ds.shuffle_idx[0].tolist() != list(range(10))
    assert ds.doc_idx[0].tolist() != list(range(10))


def test_leftover_tokens_dropped(tmp_path):
    indexed = make_data(tmp_path, [10, 10, 10])  # 30 tokens, seq 7 -> 4 samples use 29
    ds = GPTDataset("train", indexed, np.arange(3), 4, seq_length=7, seed=0)
    assert (ds.samples_per_epoch, len(ds)) == (4, 4)
    used = np.unique(np.concatenate([ds[i] for i in range(4)]))
    assert len(used) == 29


def test_samples_independent_of_num_samples(tmp_path):
    indexed = make_data(tmp_path, SIZES)
    small = GPTDataset("train", indexed, np.arange(10), 50, seq_length=8, seed=3)
    large = GPTDataset("train", indexed, np.arange(10), 500, seq_length=8, seed=3)
    assert (small.num_epochs, len(small), large.num_epochs, len(large)) == (5, 50, 50, 500)
    for i in range(50):
        np.testing.assert_array_equal(small[i], large[i])
    # Epochs differ from each other (documents reshuffled per epoch).
    assert not np.array_equal(large.doc_idx[0], large.doc_idx[1])
    assert large[-1].shape == (9,)


def test_deterministic_and_cached(tmp_path):
    indexed = make_data(tmp_path, SIZES)
    a = GPTDataset("train", indexed, np.arange(10), 30, seq_length=8, seed=5)
    names = sorted(os.path.basename(p) for p in a.cache_paths.values())
    assert all(os.path.isfile(p) for p in a.cache_paths.values())
    assert names[0].startswith("corpus_text_document_train_indexmap_8sl_5s_3ep_")
    assert names[0].endswith("_doc_idx.npy")
    # Second construction loads the cache: same samples, arrays come back memory-mapped.
    b = GPTDataset("train", indexed, np.arange(10), 30, seq_length=8, seed=5)
    assert isinstance(b.shuffle_idx, np.memmap)
    for i in range(30):
        np.testing.assert_array_equal(a[i], b[i])
    # Fresh build without the cache gives the same bytes.
    for p in a.cache_paths.values():
        os.remove(p)
    c = GPTDataset("train", indexed, np.arange(10), 30, seq_length=8, seed=5)
    np.testing.assert_array_equal(np.asarray(b.sample_idx), c.sample_idx)
    d = GPTDataset("train", indexed, np.arange(10), 30, seq_length=8, seed=6)
    assert not np.array_equal(np.asarray(c.shuffle_idx), d.shuffle_idx)


def test_too_few_tokens(tmp_path):
    indexed = make_data(tmp_path, [3, 4])
    expected = "train: 2 documents of .* hold 7 tokens, fewer than one sample of seq_length \\+ 1 = 9"
    with pytest.raises(ValueError, match=expected):
        GPTDataset("train", indexed, np.arange(2), 1, seq_length=8, seed=0)


def test_parse_split():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("8/2") == [0.8, 0.2, 0.0]
    for bad in ["", "a,b,c", "1,2,3,4", "-1,2,3", "0,0,0"]:
        with pytest.raises(ValueError, match=f"split {bad!r}: expected up to three"):
            parse_split(bad)


def test_split_boundaries():
    assert split_boundaries(parse_split("969,30,1"), 1000) == [0, 969, 999, 1000]
    assert split_boundaries(parse_split("1,1,1"), 10) == [0, 3, 7, 10]
    assert split_boundaries(parse_split("0,1,0"), 5) == [0, 0, 5, 5]


def test_build_train_valid_test(tmp_path):
    sizes = [20] * 100
    make_data(tmp_path, sizes)
    prefix = str(tmp_path / "corpus_text_document")
    train, valid, test = build_train_valid_test_datasets(prefix, "90,10,0", (40, 5, 5), seq_length=16, seed=1)
    assert test is None
    assert train.documents.tolist() == list(range(90))
    assert valid.documents.tolist() == list(range(90, 100))
    # Contiguous split: valid samples only hold tokens of documents 90..99.
    valid_tokens = np.concatenate([valid[i] for i in range(len(valid))])
    assert valid_tokens.min() >= 90 * 20 and valid_tokens.max() < 100 * 20
    assert (len(train), len(valid)) == ((90 * 20 - 1) // 16, (10 * 20 - 1) // 16)
    _, none_valid, _ = build_train_valid_test_datasets(prefix, "90,10,0", (40, 0, 0), 16, 1)
    assert none_valid is None
    with pytest.raises(ValueError, match="split '90,x': expected"):
        build_train_valid_test_datasets(prefix, "90,x", (1, 1, 1), 16, 1)


def _distributed_worker(rank, prefix, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ds = GPTDataset("train", MMapIndexedDataset(prefix), np.arange(10), 20, seq_length=8, seed=2)
        # Rank 0 built in memory and saved; rank 1 waited on the barrier and memory-mapped the files.
        results[rank] = (isinstance(ds.shuffle_idx, np.memmap), [ds[i].tolist() for i in range(20)])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rank0_builds_others_load(tmp_path):
    import socket

    import torch.multiprocessing as mp

    make_data(tmp_path, SIZES)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(str(tmp_path / "corpus_text_document"), port, results), nprocs=2)
        (built0, samples0), (loaded1, samples1) = results[0], results[1]
    assert (built0, loaded1) == (False, True)
    assert samples0 == samples1
