"""Blending: each share within 0.2% of its weight over every 1000-sample window (README "Data"),
order independent of num_samples."""

import numpy as np
import pytest

from megatron.data.blended_dataset import PERIOD, BlendedDataset, BlendIndex, blend_period, quantize_weights
from megatron.data.datasets import build_datasets, weights_by_num_documents
from megatron.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder

# The Pile's 22 component weights (epochs x share of the train set, in percent), as a realistic mix.
PILE = [18.11, 14.40, 12.07, 10.00, 8.26, 6.54, 5.00, 4.44, 4.07, 3.98, 3.07, 2.49, 2.17, 1.85, 1.24,
        1.02, 0.89, 0.38, 0.15, 0.13, 0.07, 0.06]


def worst_window_error(dataset_of_sample, weights, window=1000):
    w = np.asarray(weights, dtype=float) / np.sum(weights)
    worst = 0.0
    for j, wj in enumerate(w):
        c = np.concatenate([[0], np.cumsum(dataset_of_sample == j)])
        worst = max(worst, float(np.abs((c[window:] - c[:-window]) / window - wj).max()))
    return worst


def test_quantize_weights():
    assert quantize_weights([1, 1, 1]).tolist() == [21846, 21845, 21845]
    assert quantize_weights([1e-9, 1.0]).tolist() == [1, 65535]  # a tiny weight keeps one slot
    assert quantize_weights([0, 3, 1]).tolist() == [0, 49152, 16384]
    assert int(quantize_weights(PILE).sum()) == PERIOD
    for bad in ([], [1, -1], [0, 0], [float("nan")]):
        with pytest.raises(ValueError, match="non-negative numbers with a positive sum"):
            quantize_weights(bad)


def test_greedy_period_is_exact():
    dataset, rank = blend_period(np.array([5, 3, 2]) * (PERIOD // 10) + np.array([2, 2, 2]), [0, 1, 2])
    assert np.bincount(dataset).tolist() == [32767, 19661, 13108]
    assert rank[dataset == 1].tolist() == list(range(19661))
    # The greedy rule itself on a small period: 0.5 / 0.3 / 0.2 with ties to the earliest.
    assert blend_period(np.array([5, 3, 2]), [0, 1, 2])[0].tolist() == [0, 1, 2, 0, 0, 1, 0, 2, 1, 0]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], PILE, [50, 1, 1, 1, 1, 1, 1, 1]])
def test_weights_within_0_2_percent_over_any_1000_samples(weights):
    # Measured worst windows: 0.10% (0.7/0.3), 0.07% (thirds), 0.14% (Pile), 0.15% (50:1x7).
    index = BlendIndex(weights, seed=3)
    dataset, sample = index.lookup(np.arange(300_000))
    assert worst_window_error(dataset, weights) < 0.002
    # Each dataset's samples are consumed in order, without gaps or repeats.
    for j in range(len(weights)):
        assert np.array_equal(sample[dataset == j], np.arange(np.count_nonzero(dataset == j)))
    assert index.counts(300_000).tolist() == np.bincount(dataset, minlength=len(weights)).tolist()
    assert index(123_456) == (int(dataset[123_456]), int(sample[123_456]))


def test_seed_only_breaks_ties():
    # Four equal weights tie at every step: the seed picks the round-robin order, nothing else.
    orders = [BlendIndex([1, 1, 1, 1], s).dataset[:8].tolist() for s in range(6)]
    assert orders[0] == BlendIndex([1, 1, 1, 1], 0).dataset[:8].tolist()
    assert all(sorted(o[:4]) == [0, 1, 2, 3] and o[:4] == o[4:] for o in orders)
    assert len({tuple(o) for o in orders}) > 1


def make_prefix(tmp_path, name, sizes, base):
    """Documents of unique tokens base, base+1, ...: a token tells which dataset it came from."""
    prefix = str(tmp_path / name)
    with MMapIndexedDatasetBuilder(prefix, np.int32) as b:
        start = base
        for n in sizes:
            b.add_document(np.arange(start, start + n))
            start += n
    return prefix


@pytest.fixture
def prefixes(tmp_path):
    rng = np.random.default_rng(0)
    return [make_prefix(tmp_path, f"d{j}", rng.integers(5, 60, size=40 * (j + 1)), 1_000_000 * (j + 1))
            for j in range(3)]


def test_blend_prefix_is_independent_of_num_samples(prefixes):
    small = build_datasets(None, prefixes, None, None, [0.5, 0.3, 0.2], None, None, "", (60, 0, 0), 16, seed=7)[0]
    large = build_datasets(None, prefixes, None, None, [0.5, 0.3, 0.2], None, None, "", (3000, 0, 0), 16, seed=7)[0]
    assert isinstance(large, BlendedDataset) and (len(small), len(large)) == (60, 3000)
    for i in range(60):
        assert np.array_equal(small[i], large[i])
    # Every sample comes whole from the dataset the index names; proportions hold.
    source = np.array([int(large[i][0]) // 1_000_000 - 1 for i in range(3000)])
    assert np.array_equal(source, large.index.lookup(np.arange(3000))[0])
    assert np.abs(np.bincount(source) / 3000 - [0.5, 0.3, 0.2]).max() < 0.002
    # Components were sized by the blend: dataset 2 (smallest share) wraps into a second epoch.
    assert [c.num_samples for c in large.datasets] == large.index.counts(3000).tolist()


def test_build_datasets_routes_and_defaults(prefixes, tmp_path):
    # data_path + split: the contiguous document split, as build_train_valid_test_datasets.
    train, valid, test = build_datasets(prefixes[2], None, None, None, None, None, None, "8,2", (50, 10, 5), 16, 1)
    ref = build_train_valid_test_datasets(prefixes[2], "8,2", (50, 10, 5), 16, 1)
    assert test is None and np.array_equal(train[7], ref[0][7]) and np.array_equal(valid[3], ref[1][3])
    # Unset weights: proportional to token counts.
    tokens = [int(MMapIndexedDataset(p).sizes.sum()) for p in prefixes]
    train, valid, test = build_datasets(None, prefixes, prefixes[:1], None, None, None, None, "", (500, 20, 0), 16, 1)
    assert np.allclose(train.weights, np.array(tokens) / sum(tokens), atol=1 / PERIOD)
    assert isinstance(valid, GPTDataset) and len(valid) >= 20 and test is None
    # A zero weight drops the dataset; one left means no blending.
    only = build_datasets(None, prefixes, None, None, [0, 1, 0], None, None, "", (40, 0, 0), 16, 1)[0]
    assert isinstance(only, GPTDataset) and only.indexed.prefix == prefixes[1]


def test_build_datasets_errors(prefixes):
    cases = [
        ((prefixes[0], prefixes, None, None, None, None, None), "set either data_path"),
        ((None, None, None, None, None, None, None), "no training data"),
        ((None, prefixes, None, None, [1, 2], None, None),
         "train_data_weights has 2 entries but train_data_paths has 3"),
        ((None, prefixes, None, None, [1, -1, 1], None, None), "non-negative with a positive sum"),
        ((None, prefixes, None, None, None, [1.0], None), "valid_data_weights is set but valid_data_paths is not"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            build_datasets(*args, "", (10, 10, 0), 16, 0)
    with pytest.raises(ValueError, match="blended dataset 1 has 3 samples but the blend needs 5"):
        BlendedDataset([np.zeros((100, 2)), np.zeros((3, 2))], [1, 1], 10, 0)


def test_weights_by_num_documents_is_gpt_neox_formula():
    """p_i = n_i / N, q_i = p_i**alpha renormalised, weight q_i * (1 - p_i) renormalised.
    alpha 1, counts 100/300/600: p(1 - p) = 0.09, 0.21, 0.24, over 0.54 -> 1/6, 7/18, 4/9.
    alpha 0.5: sqrt(p) = 0.31623, 0.54772, 0.77460 (sum 1.63855) -> q = 0.19299, 0.33427, 0.47273;
    q(1 - p) = 0.17369, 0.23399, 0.18909 (sum 0.59678) -> 0.29105, 0.39209, 0.31686."""
    assert weights_by_num_documents([100, 300, 600], 1.0) == pytest.approx([1 / 6, 7 / 18, 4 / 9], abs=1e-12)
    assert weights_by_num_documents([100, 300, 600], 0.5) == pytest.approx([0.29105195, 0.39209082, 0.31685723],
                                                                          abs=1e-8)
    assert weights_by_num_documents([7], 0.3) == [1.0]  # alone it takes everything (the formula gives 0/0)
    with pytest.raises(ValueError, match="document counts with a positive sum"):
        weights_by_num_documents([0, 0], 0.5)


def test_weight_by_num_documents_replaces_given_weights(prefixes):
    """The fixture's prefixes hold 40, 80 and 120 documents: at alpha 1, p = 1/6, 1/3, 1/2 and
    p(1 - p) = 5/36, 8/36, 9/36 -> weights 5/22, 8/22, 9/22, whatever train_data_weights said."""
    train = build_datasets(None, prefixes, None, None, [1, 1, 1], None, None, "", (2200, 0, 0), 16, 3,
                           weights_alpha=1.0)[0]
    assert train.weights == pytest.approx([5 / 22, 8 / 22, 9 / 22], abs=1 / PERIOD)
    source = np.array([int(train[i][0]) // 1_000_000 - 1 for i in range(2200)])
    assert np.bincount(source).tolist() == pytest.approx([500, 800, 900], abs=2)
