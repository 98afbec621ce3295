"""Blended datasets and build_train_valid_test_datasets (what the trainer calls)."""
import numpy as np
import pytest

from megalite.data.blended import (BlendedDataset, blending_counts,
                                   build_train_valid_test_datasets, megatron_component_sizes,
                                   parse_data_path)
from megalite.data.gpt_dataset import GPTDataset
from megalite.data.indexed import IndexedDatasetBuilder
from megalite.errors import MegaliteError


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    """Three token files; file k's tokens are k * 1_000_000 + position, so a sample tells which
    file it came from. Sizes differ so token-count weighting is visible (about 1:2:4)."""
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(1)
    out = []
    for k, docs in enumerate([40, 80, 160]):
        prefix = str(root / f"set{k}")
        pos = k * 1_000_000
        with IndexedDatasetBuilder(prefix, np.int32) as b:
            for n in rng.integers(5, 40, size=docs):
                b.add_document(np.arange(pos, pos + n))
                pos += n
            b.finalize()
        out.append(prefix)
    return out


def test_parse_data_path():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_data_path(["0.3 a 0.7 b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_data_path(["1", "a", "0", "b"]) == (["a", "b"], [1.0, 0.0])


@pytest.mark.parametrize("words,match", [
    ([], "no dataset"), (["0.3", "a", "0.7"], "pairs"), (["a", "0.3"], "pairs"),
    (["0.3", "a", "b", "0.7"], "pairs"), (["-1", "a", "2", "b"], ">= 0"),
    (["0", "a", "0", "b"], "positive"), (["nan", "a"], "finite"), (["1", "2"], "pairs")])
def test_parse_data_path_errors(words, match):
    with pytest.raises(MegaliteError, match=match):
        parse_data_path(words)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 1, 1], [5, 1, 0.01], [0.1, 0.2, 0.3, 0.4]])
def test_blending_counts_within_one(weights):
    w = np.array(weights, float) / sum(weights)
    for size in [1, 7, 100, 999, 5000]:
        counts = blending_counts(weights, size)
        assert counts.sum() == size
        assert np.all(np.abs(counts - w * size) < 1), (size, counts, w * size)


class _Numbers:
    """A tiny stand-in component: item i of component k is the array [k, i]."""

    def __init__(self, k, n):
        self.k, self.n = k, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.array([self.k, i])


def test_blended_dataset_draws_components_in_order():
    ds = BlendedDataset([_Numbers(0, 40), _Numbers(1, 70)], [3, 7], 100)
    items = np.stack([ds[i] for i in range(100)])
    for k, n in [(0, 30), (1, 70)]:
        assert items[items[:, 0] == k, 1].tolist() == list(range(n))
    assert np.array_equal(ds[-1], ds[99])
    with pytest.raises(IndexError):
        ds[100]
    with pytest.raises(MegaliteError, match="component 1 has 69 samples but the blend draws 70"):
        BlendedDataset([_Numbers(0, 40), _Numbers(1, 69)], [3, 7], 100)


def test_single_prefix_gives_gpt_datasets(prefixes, tmp_path):
    train, valid, test = build_train_valid_test_datasets(
        [prefixes[0]], "8,2,0", (50, 10, 10), 16, 1, cache_dir=str(tmp_path))
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset) and test is None
    assert (train.num_samples, valid.num_samples) == (50, 10)
    assert len(train) >= 50 and len(valid) >= 10  # every sample of their epochs
    assert (train.sequence_range, valid.sequence_range) == ((0, 32), (32, 40))
    assert train[0].shape == (17,)


def test_zero_samples_give_none(prefixes, tmp_path):
    train, valid, test = build_train_valid_test_datasets(
        [prefixes[0]], "969,30,1", (20, 0, 0), 16, 1, cache_dir=str(tmp_path))
    assert train.num_samples == 20 and valid is None and test is None


def source_of(sample):
    return int(sample[0]) // 1_000_000


def test_weighted_blend(prefixes, tmp_path):
    path = ["0.2", prefixes[0], "0", prefixes[1], "0.8", prefixes[2]]
    train, valid, _ = build_train_valid_test_datasets(path, "9,1,0", (500, 40, 0), 16, 7,
                                                      cache_dir=str(tmp_path))
    assert isinstance(train, BlendedDataset) and len(train) == 500 and len(valid) == 40
    sources = np.array([source_of(train[i]) for i in range(500)])
    # Prefix 1 has weight 0 and takes no part; the others get their exact within-one counts.
    assert np.bincount(sources, minlength=3).tolist() == [100, 0, 400]
    assert np.array_equal(sources, np.array([0, 2])[train.dataset_index])
    for i in range(0, 500, 50):  # each item is its component's sample
        k, j = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert np.array_equal(train[i], train.datasets[k][j])
    # Every component has a little more than it must give (Megatron-style 0.5% margin).
    counts = np.bincount(train.dataset_index, minlength=2)
    assert all(len(d) >= c for d, c in zip(train.datasets, counts))


def test_unweighted_prefixes_are_weighted_by_tokens(prefixes, tmp_path):
    train, _, _ = build_train_valid_test_datasets(prefixes, "1", (700, 0, 0), 8, 7,
                                                  cache_dir=str(tmp_path))
    from megalite.data.indexed import IndexedDataset
    tokens = np.array([IndexedDataset(p).num_tokens for p in prefixes], float)
    assert np.allclose(train.weights, tokens / tokens.sum(), rtol=0, atol=1e-15)
    counts = np.bincount([source_of(train[i]) for i in range(700)], minlength=3)
    assert np.all(np.abs(counts - 700 * tokens / tokens.sum()) < 1)


def test_bad_inputs(prefixes, tmp_path):
    cache = str(tmp_path)
    with pytest.raises(MegaliteError, match="not found"):
        build_train_valid_test_datasets([prefixes[0] + "_nope"], "1", (5, 0, 0), 8, 1, cache)
    with pytest.raises(MegaliteError, match="--split"):
        build_train_valid_test_datasets([prefixes[0]], "9;1", (5, 0, 0), 8, 1, cache)
    with pytest.raises(MegaliteError, match="pairs"):
        build_train_valid_test_datasets(["0.5", prefixes[0], "0.5"], "1", (5, 0, 0), 8, 1, cache)
    # 40 documents, split 999,1: the valid split rounds to no documents, yet samples are asked.
    with pytest.raises(MegaliteError, match="valid split .* contains no tokens"):
        build_train_valid_test_datasets([prefixes[0]], "999,1", (5, 5, 0), 8, 1, cache)
    with pytest.raises(MegaliteError, match="num_samples"):
        build_train_valid_test_datasets([prefixes[0]], "1", (5, -1, 0), 8, 1, cache)


# ---- blend_rule="megatron" (exactness against megatron-core: test_megatron_parity.py) --------

def test_megatron_component_sizes():
    # ceil(ceil(n * w) * 1.005) per component; the blend holds sum(ceil(n * w)) >= n samples.
    sizes, size = megatron_component_sizes([0.2, 0.5, 0.3], 1000)
    assert sizes == [201, 503, 302] and size == 1000
    sizes, size = megatron_component_sizes([1, 1, 1], 100)
    assert sizes == [35, 35, 35] and size == 102  # ceil(34 * 1.005) = ceil(34.17)


def test_megatron_rule_weighted_blend(prefixes, tmp_path):
    path = ["0.2", prefixes[0], "0.8", prefixes[2]]
    train, _, _ = build_train_valid_test_datasets(path, "1", (333, 0, 0), 16, 7,
                                                  cache_dir=str(tmp_path), blend_rule="megatron")
    assert isinstance(train, BlendedDataset) and train.blend_rule == "megatron"
    sizes, size = megatron_component_sizes([0.2, 0.8], 333)
    assert len(train) == size == 67 + 267
    assert [d.num_samples for d in train.datasets] == sizes
    for i in range(0, len(train), 7):  # each item is its component's sample
        k, j = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert np.array_equal(train[i], train.datasets[k][j])
        assert source_of(train[i]) == [0, 2][k]


def test_megatron_rule_single_weighted_prefix_is_blended(prefixes, tmp_path):
    # As in Megatron: a weight makes it a blend of one, whose component asks for 0.5% more.
    train, _, _ = build_train_valid_test_datasets(["1", prefixes[1]], "1", (200, 0, 0), 16, 7,
                                                  cache_dir=str(tmp_path), blend_rule="megatron")
    assert isinstance(train, BlendedDataset) and len(train) == 200
    assert train.datasets[0].num_samples == 201
    assert train.dataset_index.tolist() == [0] * 200
    plain, _, _ = build_train_valid_test_datasets([prefixes[1]], "1", (200, 0, 0), 16, 7,
                                                  cache_dir=str(tmp_path), blend_rule="megatron")
    assert isinstance(plain, GPTDataset) and plain.num_samples == 200


def test_megatron_rule_unweighted_blend(prefixes, tmp_path):
    # One epoch of each component, weighted by its sample count; the blend has n samples.
    train, _, _ = build_train_valid_test_datasets(prefixes, "1", (300, 0, 0), 16, 7,
                                                  cache_dir=str(tmp_path), blend_rule="megatron")
    lengths = [len(d) for d in train.datasets]
    assert [d.num_samples for d in train.datasets] == [None] * 3
    assert [d.num_epochs for d in train.datasets] == [1] * 3
    assert len(train) == 300
    assert np.allclose(train.weights, np.array(lengths) / sum(lengths), rtol=0, atol=1e-15)
    with pytest.raises(MegaliteError, match=f"holds {sum(lengths)} samples .* but 100000"):
        build_train_valid_test_datasets(prefixes, "1", (100000, 0, 0), 16, 7,
                                        cache_dir=str(tmp_path), blend_rule="megatron")


def test_unknown_blend_rule(prefixes, tmp_path):
    with pytest.raises(MegaliteError, match="--blend-rule 'tijdeman': expected one of megalite, megatron"):
        build_train_valid_test_datasets([prefixes[0]], "1", (5, 0, 0), 8, 1, str(tmp_path),
                                        blend_rule="tijdeman")
