"""The one call the training setup makes to get its train / valid / test datasets.

Two ways to name the data, as in GPT-NeoX:

* ``data_path`` + ``split``: one preprocessed dataset whose documents are cut contiguously into
  train / valid / test by the split weights (``gpt_dataset.build_train_valid_test_datasets``);
* ``train_paths`` / ``valid_paths`` / ``test_paths`` (+ optional ``*_weights``): each split is its
  own list of dataset prefixes, every document of each used, blended by weight
  (``blended_dataset``). A split with one prefix is that prefix's GPTDataset, unblended.

Weights left unset are proportional to each prefix's token count, so a corpus sharded into
prefixes of any sizes is sampled as if it were one dataset (every token about once per epoch).
GPT-NeoX instead defaults to equal weights, which would read a small shard as often as a large
one. Given weights are relative (normalised to sum 1); a prefix with weight 0 is left out.
GPT-NeoX's `weight_by_num_documents` replaces them by `weights_by_num_documents` of each split's
document counts.

Sample order is a function of the data and ``seed`` only: each GPTDataset's order does not
depend on its sample count, nor does the blend's, so asking for more samples (a longer run)
only appends.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron.data.blended_dataset import BlendedDataset, BlendIndex
from megatron.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.token_ids import check_token_ids
from megatron.data.streaming import StreamingDataset

SPLIT_NAMES = ("train", "valid", "test")


def _check_weights(name: str, paths: Sequence[str], weights: Sequence[float] | None) -> None:
    if weights is None:
        return
    if len(weights) != len(paths):
        raise ValueError(f"{name}_data_weights has {len(weights)} entries but {name}_data_paths has {len(paths)}")
    if any(not np.isfinite(float(w)) or float(w) < 0 for w in weights) or sum(float(w) for w in weights) <= 0:
        raise ValueError(f"{name}_data_weights must be non-negative with a positive sum, got {list(weights)}")


def weights_by_num_documents(num_docs: Sequence[int], alpha: float) -> list[float]:
    """GPT-NeoX's blend weights from document counts n_i (XLM-R's tempered sampling,
    arXiv:1911.02116): with p_i = n_i / sum(n), q_i = p_i ** alpha / sum_j p_j ** alpha, the
    weight is q_i * (1 - p_i), renormalised. alpha < 1 lifts the small datasets; the (1 - p_i)
    factor lowers each dataset by its own share once more."""
    counts = np.asarray(num_docs, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"weight_by_num_documents needs document counts with a positive sum, got {list(num_docs)}")
    if len(counts) == 1:  # (1 - p) is 0 for a lone dataset: it simply takes everything
        return [1.0]
    p = counts / counts.sum()
    q = p**alpha / np.sum(p**alpha)
    w = q * (1.0 - p)
    return [float(x) for x in w / w.sum()]


def build_blended_dataset(
    name: str,
    paths: Sequence[str],
    weights: Sequence[float] | None,
    num_samples: int,
    seq_length: int,
    seed: int,
    vocab_size: int | None = None,
    weights_alpha: float | None = None,
) -> GPTDataset | BlendedDataset:
    """``num_samples`` samples drawn from all documents of ``paths``, blended by ``weights``
    (None: by token count; ``weights_alpha`` set: by document count, ``weights_by_num_documents``).
    Each component is sized to what the blend takes from it. Given the tokenizer's
    ``vocab_size``, every token id of every dataset is checked against it."""
    _check_weights(name, paths, weights)
    indexed = [MMapIndexedDataset(p) for p in paths]
    if vocab_size is not None:
        for ds in indexed:
            check_token_ids(ds, vocab_size)
    if weights_alpha is not None:
        weights = weights_by_num_documents([len(ds.sizes) for ds in indexed], weights_alpha)
    elif weights is None:
        weights = [float(ds.sizes.sum(dtype=np.int64)) for ds in indexed]
        if sum(weights) <= 0:
            raise ValueError(f"{name}: the datasets {list(paths)} hold no tokens")
    kept = [j for j, w in enumerate(weights) if float(w) > 0]
    if len(kept) == 1:
        ds = indexed[kept[0]]
        return GPTDataset(name, ds, np.arange(len(ds)), num_samples, seq_length, seed)
    kept_weights = [float(weights[j]) for j in kept]
    need = BlendIndex(kept_weights, seed).counts(num_samples)
    components = [
        GPTDataset(name, indexed[j], np.arange(len(indexed[j])), int(n), seq_length, seed) for j, n in zip(kept, need)
    ]
    return BlendedDataset(components, kept_weights, num_samples, seed)


def build_datasets(
    data_path: str | None,
    train_paths: Sequence[str] | None,
    valid_paths: Sequence[str] | None,
    test_paths: Sequence[str] | None,
    train_weights: Sequence[float] | None,
    valid_weights: Sequence[float] | None,
    test_weights: Sequence[float] | None,
    split: str,
    num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    vocab_size: int | None = None,
    weights_alpha: float | None = None,
) -> tuple:
    """(train, valid, test) datasets; a split with no data or no requested samples is None.

    ``vocab_size`` (the tokenizer's) makes every dataset's token ids checked against it on open,
    so data made with another tokenizer fails here, naming the file, instead of in the first
    step's embedding lookup. ``weights_alpha`` (weight_by_num_documents' weighted_sampler_alpha)
    weighs each split's prefixes by document count instead of ``*_weights``."""
    lists = (train_paths, valid_paths, test_paths)
    if data_path and any(lists):
        raise ValueError("set either data_path (with split) or train/valid/test_data_paths, not both")
    if data_path:
        return build_train_valid_test_datasets(data_path, split, num_samples, seq_length, seed, vocab_size)
    if not train_paths:
        raise ValueError("no training data: set data_path or train_data_paths")
    out = []
    for name, paths, weights, n in zip(SPLIT_NAMES, lists, (train_weights, valid_weights, test_weights), num_samples):
        if weights and not paths:
            raise ValueError(f"{name}_data_weights is set but {name}_data_paths is not")
        if not paths or n <= 0:
            out.append(None)
            continue
        out.append(build_blended_dataset(name, list(paths), weights, n, seq_length, seed, vocab_size, weights_alpha))
    return out[0], out[1], out[2]


def build_streaming_datasets(
    train_paths: Sequence[str],
    valid_paths: Sequence[str] | None,
    test_paths: Sequence[str] | None,
    tokenizer_spec: tuple[str, str | None, str | None],
    seq_length: int,
    seed: int,
    workers: int,
    text_key: str = "text",
    shuffle_files: bool = True,
    cache_dir: str | None = None,
) -> tuple:
    """(train, valid, test) StreamingDatasets over raw jsonl / jsonl.zst / txt files (globs allowed).

    Training files are read in a per-epoch seeded order when ``shuffle_files``; validation and
    test files always in the given order, so every evaluation sees the same samples. Streams are
    endless, so no sample counts are needed. Blending weights do not apply to streams.
    """
    if not train_paths:
        raise ValueError("streaming needs train_data_paths (raw jsonl / jsonl.zst files or globs)")
    out = []
    for name, paths in zip(SPLIT_NAMES, (train_paths, valid_paths, test_paths)):
        if not paths:
            out.append(None)
            continue
        order_seed = seed if (name == "train" and shuffle_files) else None
        out.append(StreamingDataset(list(paths), tokenizer_spec, seq_length, order_seed, workers, text_key,
                                    cache_dir=cache_dir))
    return out[0], out[1], out[2]
