"""The C++ index builders (megalite._C) against numpy, their twins (tests/index_reference.py)
and megatron-core's own helpers.

Everything here is exact: the generator is numpy's legacy MT19937 reproduced bit for bit, so
every comparison is equality, never a tolerance.
"""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import index_reference as ref  # tests/index_reference.py (pyproject: pytest pythonpath)
from megalite import _C
from megalite.data.gpt_dataset import samples_available

with warnings.catch_warnings():  # megatron-core warns that Apex / Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets import helpers_cpp as megatron_helpers

SETTINGS = settings(max_examples=60, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def test_generator_is_numpys_random_state():
    # Raw outputs: the RandomState's own MT19937 stream, for seeds at both ends of the range.
    for seed in [0, 1, 1234, 2**32 - 1]:
        ours = _C.LegacyRandomState(seed).outputs(2000)
        theirs = np.random.RandomState(seed)._bit_generator.random_raw(2000)
        assert ours.tolist() == theirs.tolist()
    # The first output of MT19937 seeded with 5489 (init_genrand's default), as published with
    # the reference implementation: an independent check of the generator itself.
    assert int(_C.LegacyRandomState(5489).outputs(1)[0]) == 3499211612


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_generator_refuses_seeds_numpy_refuses(seed):
    with pytest.raises(ValueError, match=r"\[0, 2\^32 - 1\]"):
        _C.LegacyRandomState(seed)
    with pytest.raises(ValueError):
        np.random.RandomState(seed)


@SETTINGS
@given(seed=seeds, bound=st.one_of(st.integers(0, 50), st.integers(1, 2**32 - 1),
                                   st.integers(2**32, 2**63)))
def test_bounded_draws_are_numpys(seed, bound):
    # Legacy randint over [0, bound] draws with the same masked rejection as RandomState.shuffle
    # (32-bit outputs below 2^32, two outputs high-first above), so it pins both paths; bounds
    # just above a power of two reject often, exercising the rejection loop.
    ours = _C.LegacyRandomState(seed).intervals(bound, 40)
    theirs = np.random.RandomState(seed).randint(0, bound + 1, size=40, dtype=np.uint64)
    assert ours.tolist() == theirs.tolist()
    assert int(ours.max()) <= bound


def test_bounded_draws_are_uniform():
    # 60000 draws in [0, 5]: each count is Binomial(60000, 1/6), sd ~ 91; allow 5 sd. The seed is
    # fixed, so this is deterministic; it fails if the bounded method were badly biased.
    counts = np.bincount(_C.LegacyRandomState(7).intervals(5, 60000).astype(np.int64), minlength=6)
    assert np.all(np.abs(counts - 10000) < 5 * 91.3), counts


@SETTINGS
@given(begin=st.integers(0, 1000), count=st.integers(0, 40), epochs=st.integers(1, 5),
       separate=st.booleans(), seed=seeds, data=st.data())
def test_document_and_shuffle_index_match_numpy(begin, count, epochs, separate, seed, data):
    separate = separate and epochs >= 2
    rng = _C.LegacyRandomState(seed)
    numpy_rng = np.random.RandomState(seed)
    a = _C.build_document_index(begin, begin + count, epochs, separate, rng)
    b = ref.build_document_index(begin, begin + count, epochs, separate, numpy_rng)
    assert a.dtype == b.dtype == np.int32 and a.tolist() == b.tolist()
    # Each id appears once per epoch; with a separate final epoch the last copy is a
    # permutation on its own and the first epochs-1 copies hold every id epochs-1 times.
    ids = np.arange(begin, begin + count)
    assert np.array_equal(np.sort(a), np.repeat(ids, epochs))
    if separate:
        assert np.array_equal(np.sort(a[len(a) - count:]), ids)
    # The shuffle index continues the same generator, as Megatron's does.
    total = data.draw(st.integers(0, 300))
    first = data.draw(st.integers(0, total))
    c = _C.build_shuffle_index(total, first, rng)
    d = ref.build_shuffle_index(total, first, numpy_rng)
    assert c.dtype == d.dtype == np.int64 and c.tolist() == d.tolist()
    assert np.array_equal(np.sort(c[:first]), np.arange(first))
    assert np.array_equal(np.sort(c[first:]), np.arange(first, total))


def test_document_index_shuffles_and_seed_matters():
    a = _C.build_document_index(0, 1000, 1, False, _C.LegacyRandomState(1))
    assert not np.array_equal(a, np.arange(1000))
    assert not np.array_equal(a, _C.build_document_index(0, 1000, 1, False, _C.LegacyRandomState(2)))


def test_document_index_bad_arguments():
    rng = _C.LegacyRandomState(0)
    with pytest.raises(ValueError, match="separate_final_epoch"):
        _C.build_document_index(0, 5, 1, True, rng)
    with pytest.raises(ValueError, match="begin"):
        _C.build_document_index(5, 2, 1, False, rng)
    with pytest.raises(ValueError, match="num_epochs"):
        _C.build_document_index(0, 2, 0, False, rng)
    with pytest.raises(ValueError, match="first"):
        _C.build_shuffle_index(5, 6, rng)


@st.composite
def sample_index_inputs(draw):
    """Sizes (some 0, some shorter and some longer than seq_length), a shuffled multi-epoch
    document index over them, seq_length, the extra-token flag and every sample count the
    stream holds, a partial last one included."""
    sizes = np.array(draw(st.lists(st.integers(0, 30), min_size=1, max_size=25)), np.int32)
    epochs = draw(st.integers(1, 3))
    doc = _C.build_document_index(0, len(sizes), epochs, False, _C.LegacyRandomState(draw(seeds)))
    seq_length = draw(st.integers(2, 40))
    extra = draw(st.booleans())
    stream = int(sizes.sum()) * epochs - extra
    partial = draw(st.booleans())
    most = max(0, -(-stream // seq_length) if partial else stream // seq_length)
    return sizes, doc, seq_length, draw(st.integers(0, most)), extra, partial


@SETTINGS
@given(sample_index_inputs())
def test_sample_index_matches_reference(inputs):
    sizes, doc, seq_length, num_samples, extra, partial = inputs
    a = _C.build_sample_index(sizes, doc, seq_length, num_samples, extra, partial)
    b = ref.build_sample_index(sizes, doc, seq_length, num_samples, extra, partial)
    assert a.dtype == b.dtype == np.int64 and a.shape == (num_samples + 1, 2)
    assert a.tolist() == b.tolist()


@SETTINGS
@given(sample_index_inputs())
def test_sample_index_is_megatrons(inputs):
    # megatron-core's helper builds every sample the epochs provide (samples_available: the
    # count GPTDataset asks ours for); both must give the same rows.
    sizes, doc, seq_length, _, extra, partial = inputs
    tokens, epochs = int(sizes.sum()), len(doc) // len(sizes)
    if tokens < 2:
        return  # Megatron's helper requires tokens_per_epoch > 1
    count = samples_available(epochs, tokens, seq_length, extra, not partial)
    ours = _C.build_sample_index(sizes, doc, seq_length, count, extra, partial)
    theirs = megatron_helpers.build_sample_idx_int64(sizes, doc, seq_length, epochs, tokens,
                                                     not partial, int(extra))
    assert ours.tolist() == theirs.tolist()


@SETTINGS
@given(sample_index_inputs())
def test_sample_index_cuts_the_token_stream(inputs):
    # Independent of both implementations: give every token a unique value, lay the documents
    # out in document-index order, and check sample i is stream[i*seq : i*seq + seq + x] (the
    # partial last one: what is left of the stream).
    sizes, doc, seq_length, num_samples, extra, partial = inputs
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    tokens = [np.arange(starts[d], starts[d + 1]) for d in range(len(sizes))]
    stream = np.concatenate([tokens[d] for d in doc])
    index = _C.build_sample_index(sizes, doc, seq_length, num_samples, extra, partial)
    for i in range(num_samples):
        (r0, o0), (r1, o1) = index[i], index[i + 1]
        if r0 == r1:
            got = tokens[doc[r0]][o0:o1 + extra]
        else:
            got = np.concatenate([tokens[doc[r0]][o0:]] + [tokens[doc[r]] for r in range(r0 + 1, r1)]
                                 + [tokens[doc[r1]][:o1 + extra]])
        assert np.array_equal(got, stream[i * seq_length:(i + 1) * seq_length + extra])


def test_sample_index_errors_instead_of_reading_past_the_end():
    sizes = np.array([5, 5], np.int32)
    doc = np.array([0, 1], np.int32)
    assert _C.build_sample_index(sizes, doc, 3, 3, True, False).shape == (4, 2)  # 3*3+1 = 10
    with pytest.raises(ValueError, match="fewer than 4 samples"):
        _C.build_sample_index(sizes, doc, 3, 4, True, False)
    with pytest.raises(ValueError):
        ref.build_sample_index(sizes, doc, 3, 4, True, False)
    # Kept partial: the 4th sample is the last token of the stream, to be padded.
    assert _C.build_sample_index(sizes, doc, 3, 4, True, True)[4].tolist() == [1, 4]
    with pytest.raises(ValueError, match="outside sizes"):
        _C.build_sample_index(sizes, np.array([0, 7], np.int32), 3, 3, True, False)
    with pytest.raises(ValueError, match="empty"):
        _C.build_sample_index(sizes, np.array([], np.int32), 3, 1, True, True)


def assert_counts_within_one(weights, dataset_index):
    """After every prefix of t steps, each count is within 1 - delta (< 1) of w * t, the bound of
    Tijdeman's rule with delta = 1 / (2K - 2) for K positive weights."""
    assert max_deviation(weights, dataset_index) <= tijdeman_bound(weights) + 1e-9


def tijdeman_bound(weights):
    positive = int((np.asarray(weights) > 0).sum())
    return 1 - 1 / (2 * positive - 2) if positive > 1 else 0.0


def max_deviation(weights, dataset_index):
    """max over steps t and datasets k of |count_k(t) - w_k * t|. (1e-9 slack in the callers:
    w * t is itself rounded; the guarantee is for exact arithmetic.)"""
    w = np.asarray(weights, np.float64)
    onehot = np.zeros((len(dataset_index), len(w)))
    onehot[np.arange(len(dataset_index)), dataset_index] = 1
    counts = np.cumsum(onehot, axis=0)
    ideal = np.arange(1, len(dataset_index) + 1)[:, None] * w[None, :]
    return float(np.abs(counts - ideal).max(initial=0))


raw_weights = st.lists(st.floats(0, 100), min_size=1, max_size=8).filter(lambda w: sum(w) > 0)


@SETTINGS
@given(raw=raw_weights, size=st.integers(0, 400))
def test_blending_index_matches_reference_and_is_within_one(raw, size):
    w = np.array(raw) / sum(raw)
    a_ds, a_s = _C.build_blending_index(w, size)
    b_ds, b_s = ref.build_blending_index(w, size)
    assert a_ds.dtype == np.int16 and a_s.dtype == np.int64
    assert a_ds.tolist() == b_ds.tolist() and a_s.tolist() == b_s.tolist()
    assert_counts_within_one(w, a_ds)
    # The sample taken from dataset k is the number already drawn from k: 0, 1, 2, ...
    for k in range(len(w)):
        assert a_s[a_ds == k].tolist() == list(range(int((a_ds == k).sum())))


@SETTINGS
@given(raw=raw_weights.filter(lambda w: min(w) > 0), size=st.integers(0, 400))
def test_megatron_blending_index_is_megatrons(raw, size):
    w = np.array(raw) / sum(raw)
    a_ds, a_s = _C.build_blending_index_megatron(w, size)
    theirs_ds, theirs_s = np.zeros(size, np.int16), np.zeros(size, np.int64)
    megatron_helpers.build_blending_indices(theirs_ds, theirs_s, w, len(w), size, False)
    b_ds, b_s = ref.build_blending_index_megatron(w, size)
    assert a_ds.dtype == np.int16 and a_s.dtype == np.int64
    assert a_ds.tolist() == theirs_ds.tolist() == b_ds.tolist()
    assert a_s.tolist() == theirs_s.tolist() == b_s.tolist()


# Five datasets where Megatron's rule falls more than one sample behind a share (README).
FIVE = list(np.array([8, 8, 1.0625, 1.0625, 1.0625]) / 19.1875)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.3, 0.7], [0.01, 0.99], [1 / 3] * 3,
                                     [0.1, 0.2, 0.3, 0.4], [0.0, 0.25, 0.75], FIVE])
def test_blending_counts_within_one_of_ideal(weights):
    dataset_index, _ = _C.build_blending_index(np.array(weights), 20000)
    assert_counts_within_one(weights, dataset_index)


def test_megatron_rule_falls_more_than_one_behind_on_five_datasets():
    ours, _ = _C.build_blending_index(np.array(FIVE), 46)
    theirs, _ = _C.build_blending_index_megatron(np.array(FIVE), 46)
    # After 46 samples Megatron's rule has drawn 18 from the second dataset, whose share is
    # 46 * 8 / 19.1875 = 19.18: 1.18 behind. Tijdeman's rule has drawn 19.
    assert 46 * FIVE[1] == pytest.approx(19.18, abs=0.005)
    assert (theirs == 1).sum() == 18 and (ours == 1).sum() == 19
    assert max_deviation(FIVE, ours) < 1 < max_deviation(FIVE, theirs) - 1e-9


def test_blending_index_bad_weights():
    for build in (_C.build_blending_index, _C.build_blending_index_megatron):
        with pytest.raises(ValueError, match="finite"):
            build(np.array([0.5, np.nan]), 10)
        with pytest.raises(ValueError, match="finite"):
            build(np.array([1.5, -0.5]), 10)
        with pytest.raises(ValueError, match="weights"):
            build(np.array([]), 10)
        with pytest.raises(ValueError, match="all weights are 0"):
            build(np.array([0.0, 0.0]), 10)
