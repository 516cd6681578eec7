"""GPT training samples cut from an mmap indexed dataset, in an order that never depends on
how many samples were asked for.

Design. GPT-NeoX builds one index for all the epochs a run needs, shuffling documents across
those epochs together, so asking for more samples (a run resumed with a larger ``train_iters``)
reshuffles everything and sample ``i`` changes. Here every epoch is built on its own:

* epoch ``e`` permutes the split's documents with a generator seeded by ``(seed, e)``;
* the concatenated token stream of that epoch is cut into ``S = (T - 1) // seq_length`` samples
  of ``seq_length + 1`` tokens, sample ``k`` covering stream tokens ``k*L .. k*L + L``, so each
  sample shares its last token with the next (the input/label shift). The fewer than
  ``seq_length`` tokens left at the end of the epoch are dropped;
* the same generator then permutes the ``S`` samples of the epoch;
* global sample ``i`` is sample ``shuffle[e][i % S]`` of epoch ``e = i // S``.

Epoch ``e`` depends only on the documents' sizes, ``seq_length``, ``seed`` and ``e``, so a
dataset built for 10,000 samples starts with exactly the samples of one built for 100. Enough
whole epochs are built to hold ``num_samples``; ``len()`` reports all of them.

The index (doc_idx [E, n_docs], sample_idx [E, S + 1, 2] = (position in the epoch's document
order, token offset), shuffle_idx [E, S]) is built with vectorised numpy and cached as .npy beside
the data. The cache name holds the split name, seq_length, seed, epoch count and a digest of the
documents and their sizes, which are everything the index depends on, so a stale cache cannot
be picked up. Under torch.distributed rank 0 builds and saves while the others wait on a barrier
and then load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDataset, distributed
from megatron.data.token_ids import check_token_ids

logger = logging.getLogger(__name__)

INDEX_KINDS = ("doc_idx", "sample_idx", "shuffle_idx")
# Bump when the index construction changes, so old caches are not reused.
_INDEX_VERSION = b"gpt-epochwise-v1"


def _epoch_index(sizes: np.ndarray, seq_length: int, samples_per_epoch: int, seed: int, epoch: int):
    """Document order, sample boundaries and sample order of one epoch (see module docstring)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    order = rng.permutation(len(sizes))
    ordered_sizes = sizes[order].astype(np.int64)
    ends = np.cumsum(ordered_sizes)
    # First stream token of every sample, plus one more: sample k ends where k + 1 starts.
    first = np.arange(samples_per_epoch + 1, dtype=np.int64) * seq_length
    # side="right" lands on the document that contains the token, skipping empty documents.
    pos = np.searchsorted(ends, first, side="right")
    offset = first - (ends[pos] - ordered_sizes[pos])
    sample_idx = np.stack([pos, offset], axis=1).astype(np.int32)
    shuffle = rng.permutation(samples_per_epoch)
    return order, sample_idx, shuffle


class GPTDataset:
    """Samples of ``seq_length + 1`` int64 tokens drawn from ``documents`` of ``indexed``."""

    def __init__(
        self,
        name: str,
        indexed: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
    ) -> None:
        documents = np.asarray(documents, dtype=np.int64)
        if documents.ndim != 1 or len(documents) == 0:
            raise ValueError(f"{name}: documents must be a non-empty 1-D array of sequence ids")
        if documents.min() < 0 or documents.max() >= len(indexed):
            raise ValueError(f"{name}: document ids must lie in 0..{len(indexed) - 1} ({indexed.prefix})")
        if seq_length < 1 or num_samples < 0 or seed < 0:
            raise ValueError(
                f"{name}: need seq_length >= 1, num_samples >= 0, seed >= 0; "
                f"got {seq_length}, {num_samples}, {seed}"
            )
        self.name, self.indexed, self.documents = name, indexed, documents
        self.seq_length, self.seed, self.num_samples = seq_length, seed, num_samples

        sizes = indexed.sizes[documents]
        self.tokens_per_epoch = int(sizes.sum(dtype=np.int64))
        self.samples_per_epoch = (self.tokens_per_epoch - 1) // seq_length
        if self.samples_per_epoch < 1:
            raise ValueError(
                f"{name}: {len(documents)} documents of {indexed.prefix} hold {self.tokens_per_epoch} tokens, "
                f"fewer than one sample of seq_length + 1 = {seq_length + 1}"
            )
        self.num_epochs = max(1, -(-num_samples // self.samples_per_epoch))
        digest = hashlib.sha1(_INDEX_VERSION + documents.tobytes() + sizes.astype(np.int64).tobytes()).hexdigest()[:12]
        base = os.path.join(cache_dir, os.path.basename(indexed.prefix)) if cache_dir else indexed.prefix
        stem = f"{base}_{name}_indexmap_{seq_length}sl_{seed}s_{self.num_epochs}ep_{digest}"
        self.cache_paths = {kind: f"{stem}_{kind}.npy" for kind in INDEX_KINDS}
        self.doc_idx, self.sample_idx, self.shuffle_idx = self._load_or_build(sizes)

    # ---- index construction and caching -------------------------------------------------
    def _build(self, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start = time.perf_counter()
        doc_dtype = np.int32 if len(self.indexed) < 2**31 else np.int64
        shuf_dtype = np.int32 if self.samples_per_epoch < 2**31 else np.int64
        doc_idx = np.empty((self.num_epochs, len(self.documents)), dtype=doc_dtype)
        sample_idx = np.empty((self.num_epochs, self.samples_per_epoch + 1, 2), dtype=np.int32)
        shuffle_idx = np.empty((self.num_epochs, self.samples_per_epoch), dtype=shuf_dtype)
        for e in range(self.num_epochs):
            order, samples, shuffle = _epoch_index(sizes, self.seq_length, self.samples_per_epoch, self.seed, e)
            doc_idx[e] = self.documents[order]
            sample_idx[e] = samples
            shuffle_idx[e] = shuffle
        logger.info(
            "%s: built index of %d epochs x %d samples in %.2f s",
            self.name, self.num_epochs, self.samples_per_epoch, time.perf_counter() - start,
        )
        return doc_idx, sample_idx, shuffle_idx

    def _save(self, arrays: tuple[np.ndarray, ...]) -> None:
        try:
            for kind, arr in zip(INDEX_KINDS, arrays):
                path = self.cache_paths[kind]
                tmp = f"{path}.{os.getpid()}.tmp.npy"
                np.save(tmp, arr)
                os.replace(tmp, path)  # readers never see a half-written file
        except OSError as err:
            # A read-only data directory costs a rebuild per run, not a failed run.
            logger.warning("%s: could not cache the sample index beside the data (%s)", self.name, err)

    def _load(self) -> tuple[np.ndarray, ...] | None:
        if not all(os.path.isfile(p) for p in self.cache_paths.values()):
            return None
        arrays = tuple(np.load(self.cache_paths[k], mmap_mode="r") for k in INDEX_KINDS)
        expected = (
            (self.num_epochs, len(self.documents)),
            (self.num_epochs, self.samples_per_epoch + 1, 2),
            (self.num_epochs, self.samples_per_epoch),
        )
        if tuple(a.shape for a in arrays) != expected:
            logger.warning("%s: cached index has unexpected shapes, rebuilding", self.name)
            return None
        return arrays

    def _load_or_build(self, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        dist = distributed()
        if dist is None or dist.get_rank() == 0:
            arrays = self._load()
            if arrays is None:
                arrays = self._build(sizes)
                self._save(arrays)
        if dist is not None:
            dist.barrier()
            if dist.get_rank() != 0:
                # Falls back to building locally when rank 0's files are not visible here
                # (node-local disks); the result is identical by construction.
                arrays = self._load() or self._build(sizes)
        return arrays

    # ---- sample access ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_epochs * self.samples_per_epoch

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: sample {i} out of range for {n} samples")
        epoch, j = divmod(int(i) % n, self.samples_per_epoch)
        k = int(self.shuffle_idx[epoch, j])
        d0, o0 = (int(v) for v in self.sample_idx[epoch, k])
        d1, o1 = (int(v) for v in self.sample_idx[epoch, k + 1])
        docs = self.doc_idx[epoch]
        if d0 == d1:
            parts = [self.indexed.get(int(docs[d0]), o0, o1 - o0 + 1)]
        else:
            parts = [self.indexed.get(int(docs[d0]), o0)]
            parts += [self.indexed.get(int(docs[d])) for d in range(d0 + 1, d1)]
            parts.append(self.indexed.get(int(docs[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)


def parse_split(split: str) -> list[float]:
    """"969,30,1" (or "969/30/1") -> normalised train/valid/test weights; missing ones are 0."""
    bad = (
        f"split {split!r}: expected up to three non-negative numbers separated by ',' or '/' "
        "with a positive sum, e.g. '969,30,1'"
    )
    try:
        weights = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(bad) from None
    if len(weights) > 3 or any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(bad)
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_boundaries(weights: list[float], num_documents: int) -> list[int]:
    """Contiguous document ranges: boundaries at rounded cumulative weights.

    Rounding the cumulative sums (rather than each share, as Megatron does before correcting the
    total) keeps the boundaries monotone and gives a zero-weight split no documents.
    """
    cumulative = np.cumsum([0.0] + list(weights))
    bounds = [int(np.floor(c * num_documents + 0.5)) for c in cumulative]
    bounds[-1] = num_documents
    return bounds


def build_train_valid_test_datasets(
    data_prefix: str,
    split: str,
    num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    vocab_size: int | None = None,
) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    """Split the documents of ``data_prefix`` contiguously by ``split`` and build the three
    datasets; a split with no documents or no requested samples is None. Given the tokenizer's
    ``vocab_size``, every token id of the data is checked against it first."""
    indexed = MMapIndexedDataset(data_prefix)
    if vocab_size is not None:
        check_token_ids(indexed, vocab_size)
    bounds = split_boundaries(parse_split(split), len(indexed))
    datasets: list[GPTDataset | None] = []
    for k, name in enumerate(("train", "valid", "test")):
        start, end = bounds[k], bounds[k + 1]
        if end <= start or num_samples[k] <= 0:
            datasets.append(None)
            continue
        documents = np.arange(start, end, dtype=np.int64)
        datasets.append(GPTDataset(name, indexed, documents, num_samples[k], seq_length, seed))
    return datasets[0], datasets[1], datasets[2]
