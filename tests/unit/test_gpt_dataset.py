"""GPTDataset: split rules, epochs, sample contents against the raw token stream, index cache.

Token files are written with the real IndexedDatasetBuilder; every token's value is its own
position in the .bin file, so a sample tells exactly which tokens it was cut from. The indices
themselves are compared with megatron-core's in test_megatron_parity.py.
"""
import json
import multiprocessing as mp
import os
import time
import warnings

import numpy as np
import pytest

from megalite.data.gpt_dataset import (GPTDataset, GPTDatasetConfig, final_epoch_split,
                                       num_epochs, parse_split, samples_available,
                                       split_sequence_ranges)
from megalite.data.index_cache import IndexCacheEntry, file_identity
from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalite.errors import MegaliteError


def write_dataset(prefix, doc_lengths, sentences=None):
    """Token file whose token values are their positions in .bin; ``sentences[d]`` optionally
    splits document d into sequences of those lengths."""
    pos = 0
    with IndexedDatasetBuilder(str(prefix), np.int32) as b:
        for d, n in enumerate(doc_lengths):
            b.add_document(np.arange(pos, pos + n), None if sentences is None else sentences[d])
            pos += n
        b.finalize()
    return IndexedDataset(str(prefix))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 documents of 1..70 tokens (many shorter, some longer than seq_length 16)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 71, size=60)
    return write_dataset(tmp_path_factory.mktemp("corpus") / "docs", lengths)


def stream_of(indexed, dataset):
    """The sequences of the document index, read in order, as one token array."""
    return np.concatenate([indexed.get(int(s)) for s in dataset.document_index])


def split_tokens(indexed, sequence_range):
    return np.concatenate([indexed.get(s) for s in range(*sequence_range)])


# ---- split, epochs -------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("969,30,1", [0.969, 0.03, 0.001]), ("98,2,0", [0.98, 0.02, 0.0]), ("1", [1.0, 0.0, 0.0]),
    ("98/2/0", [0.98, 0.02, 0.0]), (" 1, 1 ", [0.5, 0.5, 0.0]), ("0,1,0", [0.0, 1.0, 0.0])])
def test_parse_split(text, expected):
    assert parse_split(text) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("text", ["", "a,b", "1,2,3,4", "-1,2", "0,0,0", "1,,2", "nan,1", "inf"])
def test_parse_split_errors(text):
    with pytest.raises(MegaliteError, match="--split"):
        parse_split(text)


@pytest.mark.parametrize("n,split,expected", [
    (1000, "969,30,1", [(0, 969), (969, 999), (999, 1000)]),
    (500, "969,30,1", [(0, 484), (484, 500), (500, 500)]),  # 484.5 -> 484, 499.5 -> 500
    (10, "1,1", [(0, 5), (5, 10), (10, 10)]),
    (5, "1,1", [(0, 2), (2, 5), (5, 5)]),          # 2.5 rounds to even
    (7, "1,1", [(0, 4), (4, 7), (7, 7)]),          # 3.5 rounds to even
    (3, "1,1,1", [(0, 1), (1, 2), (2, 3)]),
    (7, "1", [(0, 7), (7, 7), (7, 7)]),
    (0, "969,30,1", [(0, 0), (0, 0), (0, 0)]),
    (100, "0,1,0", [(0, 0), (0, 100), (100, 100)])])
def test_split_sequence_ranges(n, split, expected):
    assert split_sequence_ranges(n, split) == expected


def test_split_ranges_are_megatrons():
    # Megatron's split matrix (its own functions) and the bounds its builder takes from it,
    # int(round(bookend * float(N))).
    with warnings.catch_warnings():  # megatron-core warns that Apex / Transformer Engine are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix, parse_and_normalize_split)
    for n in [1, 2, 9, 101, 500, 1500, 12345, 999_999]:
        for split in ["969,30,1", "98,2,0", "3,3,4", "1,0,1", "1,1", "90,8,2", "0.7,0.2,0.1"]:
            matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
            ours = split_sequence_ranges(n, split)
            for k, bookends in enumerate(matrix):
                if bookends is None:  # a zero-weight split: Megatron builds nothing
                    assert ours[k][0] == ours[k][1]
                else:
                    assert ours[k] == tuple(int(round(b * float(n))) for b in bookends)


@pytest.mark.parametrize("extra", [True, False])
def test_num_epochs_is_the_smallest_that_fits(extra):
    for tokens in [1, 7, 100]:
        for seq in [1, 5, 16]:
            for n in [1, 3, 40, 1000]:
                e = num_epochs(tokens, seq, n, extra)
                need = n * seq + extra
                assert e * tokens >= need and (e == 1 or (e - 1) * tokens < need)
                assert samples_available(e, tokens, seq, extra) >= n
    assert num_epochs(100, 10, None) == 1


def test_final_epoch_split_rule():
    # 100 tokens/epoch, seq 10: per epoch (100 - 1) // 10 = 9 samples, threshold int(0.8 * 9) = 7.
    # 10 samples need 101 tokens: 2 epochs, the first serves 9 samples and the second only 1:
    # shuffled separately.
    assert final_epoch_split(100, 10, 10) == 9
    assert final_epoch_split(100, 10, 15) == 9  # 6 < 7
    # 16 samples: the last epoch supplies 7, not under int(0.8 * 9) = 7: one shuffle (the
    # rule 5 * last < 4 * per_epoch would have separated it).
    assert final_epoch_split(100, 10, 16) is None
    assert final_epoch_split(100, 10, 17) is None
    assert final_epoch_split(100, 10, 5) is None  # a single epoch
    # Without the extra token: per epoch 10, threshold 8; 12 samples: the second epoch gives 2.
    assert final_epoch_split(100, 10, 12, add_extra_token=False) == 10
    assert final_epoch_split(100, 10, 18, add_extra_token=False) is None


def test_samples_available_counts_like_megatron():
    assert samples_available(1, 100, 10) == 9
    assert samples_available(1, 100, 10, add_extra_token=False) == 10
    assert samples_available(1, 100, 10, drop_last_partial=False) == 10  # 99 / 10, rounded up
    # The kept partial sample is counted in single precision: 2^24 + 1 tokens round to 2^24.
    assert samples_available(1, 2**24 + 2, 1, drop_last_partial=False) == 2**24


# ---- samples -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_samples", [1, 37, 150, 400])
def test_samples_are_cuts_of_the_document_stream(corpus, tmp_path, num_samples):
    config = GPTDatasetConfig(seq_length=16, seed=3, cache_dir=str(tmp_path))
    rng_range = split_sequence_ranges(len(corpus.sequence_lengths), "90,10,0")[0]
    ds = GPTDataset(corpus, rng_range, num_samples, config, "train")
    tokens = split_tokens(corpus, rng_range)
    # The dataset holds every sample of the epochs the request takes, as Megatron's does.
    assert ds.tokens_per_epoch == len(tokens)
    assert ds.num_epochs == num_epochs(len(tokens), 16, num_samples)
    assert len(ds) == (ds.num_epochs * len(tokens) - 1) // 16 >= num_samples
    stream = stream_of(corpus, ds)
    seen = []
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        assert np.array_equal(sample, stream[j * 16:j * 16 + 17])
        seen.append(sample)
    # The shuffle index is a permutation of all of them (not only of the first num_samples).
    assert np.array_equal(np.sort(ds.shuffle_index), np.arange(len(ds)))
    # Only tokens of the split appear, and since the samples span whole epochs, nearly all do.
    seen = np.unique(np.concatenate(seen))
    assert np.isin(seen, tokens).all()
    assert np.isin(tokens, seen).sum() >= len(tokens) - 16
    # The document index tiles the split's sequences num_epochs times.
    assert np.array_equal(np.sort(ds.document_index),
                          np.repeat(np.arange(*rng_range), ds.num_epochs))


def test_separate_final_epoch(corpus, tmp_path):
    rng_range = (0, 40)
    tokens = len(split_tokens(corpus, rng_range))
    per_epoch = (tokens - 1) // 16
    n = ((2 * tokens - 1) // 16) + 1  # two full epochs' worth plus one sample: tiny final epoch
    ds = GPTDataset(corpus, rng_range, n, GPTDatasetConfig(16, cache_dir=str(tmp_path)))
    assert ds.num_epochs == 3 and ds.separate_final_epoch and per_epoch > 5
    first = final_epoch_split(tokens, 16, n)
    # The first two epochs are whole permutations of the documents, the third on its own.
    assert np.array_equal(np.sort(ds.document_index[-40:]), np.arange(40))
    # Samples [0, first) end inside the first two epochs of the document index, so the separately
    # shuffled final epoch only feeds samples [first, len).
    assert ds.sample_index[first][0] < 2 * 40 <= ds.sample_index[first + 1][0]
    assert np.array_equal(np.sort(ds.shuffle_index[:first]), np.arange(first))
    assert np.array_equal(np.sort(ds.shuffle_index[first:]), np.arange(first, len(ds)))
    stream = stream_of(corpus, ds)
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * 16:j * 16 + 17])


def test_single_document_and_long_documents(tmp_path):
    one = write_dataset(tmp_path / "one", [50])
    ds = GPTDataset(one, (0, 1), 20, GPTDatasetConfig(seq_length=8, cache_dir=str(tmp_path)))
    stream = stream_of(one, ds)
    assert ds.num_epochs == 4  # 20 * 8 + 1 = 161 tokens from 50-token epochs
    assert len(ds) == (4 * 50 - 1) // 8
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * 8:j * 8 + 9])


def test_without_the_extra_token_samples_do_not_overlap(corpus, tmp_path):
    config = GPTDatasetConfig(16, seed=9, cache_dir=str(tmp_path), add_extra_token_to_sequence=False)
    ds = GPTDataset(corpus, (0, 30), 100, config)
    tokens = len(split_tokens(corpus, (0, 30)))
    assert ds.num_epochs == num_epochs(tokens, 16, 100, add_extra_token=False)
    assert len(ds) == ds.num_epochs * tokens // 16
    stream = stream_of(corpus, ds)
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * 16:(j + 1) * 16])


@pytest.mark.parametrize("extra", [True, False])
def test_partial_last_validation_sample_is_padded(corpus, tmp_path, extra):
    # Kept only in the valid split, and only when asked; padded with pad_token_id.
    config = GPTDatasetConfig(16, seed=4, cache_dir=str(tmp_path), add_extra_token_to_sequence=extra,
                              drop_last_partial_validation_sequence=False, pad_token_id=-7)
    tokens = len(split_tokens(corpus, (0, 7)))
    assert (tokens - extra) % 16  # the stream does end inside a sample
    valid = GPTDataset(corpus, (0, 7), 1, config, "valid")
    train = GPTDataset(corpus, (0, 7), 1, config, "train")
    assert len(valid) == len(train) + 1 == -(-(tokens - extra) // 16)
    stream = stream_of(corpus, valid)
    last = int(np.nonzero(np.asarray(valid.shuffle_index) == len(valid) - 1)[0][0])
    rest = stream[(len(valid) - 1) * 16:]
    assert np.array_equal(valid[last], np.concatenate([rest, np.full(16 + extra - len(rest), -7)]))


def test_sentence_split_files_split_by_sequence(tmp_path):
    # 4 documents of 2-3 sentences (9 sequences): like Megatron, the split is over sequences
    # (4.5 -> 4: the valid split starts inside document 1) and so is the index.
    sentences = [[3, 4], [5, 1, 2], [6, 6], [2, 7]]
    indexed = write_dataset(tmp_path / "sent", [sum(s) for s in sentences], sentences)
    lo, hi = split_sequence_ranges(9, "1,1")[1]
    assert (lo, hi) == (4, 9)
    ds = GPTDataset(indexed, (lo, hi), 5, GPTDatasetConfig(4, cache_dir=str(tmp_path)), "valid")
    assert sorted(set(ds.document_index.tolist())) == [4, 5, 6, 7, 8]
    stream = stream_of(indexed, ds)
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * 4:j * 4 + 5])


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seeds_at_both_ends_of_the_range(corpus, tmp_path, seed):
    ds = GPTDataset(corpus, (0, 60), 50, GPTDatasetConfig(16, seed=seed, cache_dir=str(tmp_path)))
    rng = np.random.RandomState(seed)
    expected = np.arange(60, dtype=np.int32)
    rng.shuffle(expected)
    assert np.array_equal(ds.document_index, expected)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_seed_outside_numpys_range_is_refused(corpus, tmp_path, seed):
    with pytest.raises(MegaliteError, match=r"--seed .*\[0, 2\^32 - 1\]"):
        GPTDataset(corpus, (0, 60), 50, GPTDatasetConfig(16, seed=seed, cache_dir=str(tmp_path)))


def test_indexing_errors(corpus, tmp_path):
    ds = GPTDataset(corpus, (0, 10), 5, GPTDatasetConfig(16, cache_dir=str(tmp_path)))
    n = len(ds)
    assert np.array_equal(ds[-1], ds[n - 1])
    with pytest.raises(IndexError):
        ds[n]


def test_bad_inputs(corpus, tmp_path):
    config = GPTDatasetConfig(16, cache_dir=str(tmp_path))
    with pytest.raises(MegaliteError, match="contains no tokens"):
        GPTDataset(corpus, (5, 5), 10, config, "test")
    with pytest.raises(MegaliteError, match="num_samples"):
        GPTDataset(corpus, (0, 5), 0, config)
    assert len(GPTDataset(corpus, (0, 5), None, config)) == (split_tokens(corpus, (0, 5)).size - 1) // 16
    with pytest.raises(MegaliteError, match="outside"):
        GPTDataset(corpus, (0, 61), 5, config)
    with pytest.raises(MegaliteError, match="need 3200000001 passes"):  # not an 8 GB allocation
        GPTDataset(write_dataset(tmp_path / "tiny", [1]), (0, 1), 200_000_000, config)
    with pytest.raises(MegaliteError, match="seq_length"):
        GPTDataset(corpus, (0, 5), 5, GPTDatasetConfig(0, cache_dir=str(tmp_path)))


# ---- cache ---------------------------------------------------------------------------------

def cache_files(cache_dir):
    return sorted(f for f in os.listdir(cache_dir) if f.endswith(".npy"))


def test_cache_is_reused_and_keyed(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    config = GPTDatasetConfig(16, seed=5, cache_dir=cache)
    first = GPTDataset(corpus, (0, 50), 100, config)
    assert first.index_built
    files = cache_files(cache)
    assert len(files) == 3
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files}

    t0 = time.perf_counter()
    again = GPTDataset(corpus, (0, 50), 100, config)
    print(f"cached index opened in {1e3 * (time.perf_counter() - t0):.2f} ms")
    assert not again.index_built
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files} == mtimes
    assert isinstance(again.sample_index, np.memmap)
    assert all(np.array_equal(first[i], again[i]) for i in range(100))

    # Every input that determines the arrays gives a new entry.
    for ds in [GPTDataset(corpus, (0, 50), 100, GPTDatasetConfig(16, seed=6, cache_dir=cache)),
               GPTDataset(corpus, (0, 50), 101, config),
               GPTDataset(corpus, (0, 50), 100, GPTDatasetConfig(8, seed=5, cache_dir=cache)),
               GPTDataset(corpus, (0, 49), 100, config),
               GPTDataset(corpus, (0, 50), 100, GPTDatasetConfig(
                   16, seed=5, cache_dir=cache, add_extra_token_to_sequence=False)),
               GPTDataset(corpus, (0, 50), 100, config, "valid"),
               GPTDataset(corpus, (0, 50), 100, GPTDatasetConfig(
                   16, seed=5, cache_dir=cache, drop_last_partial_validation_sequence=False),
                   "valid")]:
        assert ds.index_built
    assert len(cache_files(cache)) == 24
    meta = [json.load(open(os.path.join(cache, f))) for f in os.listdir(cache) if f.endswith(".json")]
    assert {m["description"]["seed"] for m in meta} == {5, 6}
    assert all(m["description"]["idx"]["path"] == os.path.abspath(corpus.prefix + ".idx")
               for m in meta)


def test_entry_of_the_old_rule_is_not_reused(corpus, tmp_path):
    # An entry as megalite's earlier rule (algorithm v1: splitmix64 shuffles, document split)
    # wrote it for the same request: a new build must ignore it, not load it.
    cache = str(tmp_path / "cache")
    old = IndexCacheEntry(cache, {
        "kind": "gpt", "idx": file_identity(corpus.prefix + ".idx"), "split": "train",
        "document_range": [0, 50], "sequence_range": [0, 50], "num_samples": 100,
        "seq_length": 16, "seed": 5}, ["document_index", "sample_index", "shuffle_index"],
        algorithm="megalite-index-v1")
    stale = GPTDataset(corpus, (0, 50), 100, GPTDatasetConfig(16, seed=5, cache_dir=str(tmp_path)))
    old.load_or_build_locked(lambda: {"document_index": stale.document_index[::-1],
                                      "sample_index": stale.sample_index,
                                      "shuffle_index": stale.shuffle_index[::-1]})
    ds = GPTDataset(corpus, (0, 50), 100, GPTDatasetConfig(16, seed=5, cache_dir=cache))
    assert ds.index_built
    assert np.array_equal(ds.document_index, stale.document_index)
    assert len(cache_files(cache)) == 6


def test_default_cache_dir_is_next_to_the_data(tmp_path):
    indexed = write_dataset(tmp_path / "data" / "d", [30, 30])
    GPTDataset(indexed, (0, 2), 3, GPTDatasetConfig(8))
    assert len(cache_files(tmp_path / "data" / "index-cache")) == 3


def test_rewritten_data_file_invalidates_the_cache(tmp_path):
    cache = str(tmp_path / "cache")
    a = write_dataset(tmp_path / "d", [30, 30])
    assert GPTDataset(a, (0, 2), 3, GPTDatasetConfig(8, cache_dir=cache)).index_built
    time.sleep(0.01)
    b = write_dataset(tmp_path / "d", [30, 31])  # same path, new size and mtime
    assert GPTDataset(b, (0, 2), 3, GPTDatasetConfig(8, cache_dir=cache)).index_built


def test_unwritable_cache_dir_is_a_clear_error(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(MegaliteError, match="cannot create the index cache"):
        GPTDataset(corpus, (0, 5), 3, GPTDatasetConfig(8, cache_dir=str(blocker / "cache")))


def _build_in_process(prefix, cache, barrier, results):
    barrier.wait()  # all processes reach the cache at the same moment
    ds = GPTDataset(IndexedDataset(prefix), (0, 60), 300, GPTDatasetConfig(16, cache_dir=cache))
    results.put((ds.index_built, np.stack([ds[i] for i in range(0, 300, 7)])))


def test_concurrent_processes_build_once(corpus, tmp_path):
    # No torch.distributed here: the file lock makes one of the processes build, the rest load.
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(corpus.prefix, cache, barrier, queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(built for built, _ in results) == 1
    assert all(np.array_equal(results[0][1], samples) for _, samples in results)
    assert len(cache_files(cache)) == 3
