"""GPTDataset: split rules, epochs, sample contents against the raw token stream, index cache.

Token files are written with the real IndexedDatasetBuilder; every token's value is its own
position in the .bin file, so a sample tells exactly which tokens it was cut from.
"""
import json
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from megalite.data.gpt_dataset import (GPTDataset, GPTDatasetConfig, final_epoch_split,
                                       num_epochs, parse_split, split_document_ranges)
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


def split_tokens(indexed, document_range):
    lo, hi = (int(indexed.document_indices[d]) for d in document_range)
    return np.concatenate([indexed.get(s) for s in range(lo, hi)])


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
    (10, "1,1", [(0, 5), (5, 10), (10, 10)]),
    (5, "1,1", [(0, 3), (3, 5), (5, 5)]),          # 2.5 rounds up
    (3, "1,1,1", [(0, 1), (1, 2), (2, 3)]),
    (7, "1", [(0, 7), (7, 7), (7, 7)]),
    (0, "969,30,1", [(0, 0), (0, 0), (0, 0)]),
    (100, "0,1,0", [(0, 0), (0, 100), (100, 100)])])
def test_split_document_ranges(n, split, expected):
    assert split_document_ranges(n, split) == expected


def test_split_ranges_follow_the_rounding_rule():
    # Against the rule written out independently: bound = floor(cumulative * N + 0.5).
    for n in [1, 2, 9, 101, 12345]:
        for split in ["969,30,1", "98,2,0", "3,3,4", "1,0,1"]:
            w = [float(x) for x in split.split(",")]
            c = np.cumsum(w) / sum(w)
            bounds = [0] + [int(np.floor(x * n + 0.5)) for x in c[:-1]] + [n]
            assert split_document_ranges(n, split) == list(zip(bounds[:-1], bounds[1:]))


def test_num_epochs_is_the_smallest_that_fits():
    for tokens in [1, 7, 100]:
        for seq in [1, 5, 16]:
            for n in [1, 3, 40, 1000]:
                e = num_epochs(tokens, seq, n)
                assert e * tokens >= n * seq + 1 and (e == 1 or (e - 1) * tokens < n * seq + 1)


def test_final_epoch_split_rule():
    # 100 tokens/epoch, seq 10: 9 whole samples per epoch. 10 samples need 101 tokens: 2 epochs,
    # the first serves 9 samples and the second only 1 (< 80% of 9): shuffled separately.
    assert final_epoch_split(100, 10, 10) == 9
    # 17 samples: the last epoch supplies 8 of 9 (89% >= 80%): one shuffle.
    assert final_epoch_split(100, 10, 17) is None
    assert final_epoch_split(100, 10, 5) is None  # a single epoch


# ---- samples -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_samples", [1, 37, 150, 400])
def test_samples_are_cuts_of_the_document_stream(corpus, tmp_path, num_samples):
    config = GPTDatasetConfig(seq_length=16, seed=3, cache_dir=str(tmp_path))
    rng_range = split_document_ranges(corpus.num_documents, "90,10,0")[0]
    ds = GPTDataset(corpus, rng_range, num_samples, config, "train")
    assert len(ds) == num_samples
    stream = stream_of(corpus, ds)
    seen = []
    for i in range(num_samples):
        j = int(ds.shuffle_index[i])
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        assert np.array_equal(sample, stream[j * 16:j * 16 + 17])
        seen.append(sample)
    # Only tokens of the split appear, and once the samples span a full epoch, all of them do.
    tokens = split_tokens(corpus, rng_range)
    seen = np.unique(np.concatenate(seen))
    assert np.isin(seen, tokens).all()
    if num_samples * 16 >= len(tokens) - 1:
        assert np.isin(tokens, seen).all()
    # The document index tiles the split's documents num_epochs times.
    assert ds.tokens_per_epoch == len(tokens)
    assert ds.num_epochs == num_epochs(len(tokens), 16, num_samples)
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
    # shuffled final epoch only feeds samples [first, n).
    assert ds.sample_index[first][0] < 2 * 40 <= ds.sample_index[first + 1][0]
    assert np.array_equal(np.sort(ds.shuffle_index[:first]), np.arange(first))
    assert np.array_equal(np.sort(ds.shuffle_index[first:]), np.arange(first, n))
    stream = stream_of(corpus, ds)
    for i in range(n):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * 16:j * 16 + 17])


def test_single_document_and_long_documents(tmp_path):
    one = write_dataset(tmp_path / "one", [50])
    ds = GPTDataset(one, (0, 1), 20, GPTDatasetConfig(seq_length=8, cache_dir=str(tmp_path)))
    stream = stream_of(one, ds)
    assert ds.num_epochs == 4  # 20 * 8 + 1 = 161 tokens from 50-token epochs
    for i in range(20):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * 8:j * 8 + 9])


def test_sentence_split_documents_split_by_document(tmp_path):
    # 4 documents of 2-3 sentences: the split is over documents, the index over sentences.
    sentences = [[3, 4], [5, 1, 2], [6, 6], [2, 7]]
    indexed = write_dataset(tmp_path / "sent", [sum(s) for s in sentences], sentences)
    lo, hi = split_document_ranges(4, "1,1")[1]  # documents 2..3 = sequences 5..8
    ds = GPTDataset(indexed, (lo, hi), 5, GPTDatasetConfig(4, cache_dir=str(tmp_path)), "valid")
    assert sorted(set(ds.document_index.tolist())) == [5, 6, 7, 8]
    stream = stream_of(indexed, ds)
    for i in range(5):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * 4:j * 4 + 5])


def test_any_integer_seed(corpus, tmp_path):
    # Seeds are taken mod 2^64 by the PRNG; negative and huge seeds work and differ.
    a = GPTDataset(corpus, (0, 60), 50, GPTDatasetConfig(16, seed=-1, cache_dir=str(tmp_path)))
    b = GPTDataset(corpus, (0, 60), 50, GPTDatasetConfig(16, seed=2**64 - 1, cache_dir=str(tmp_path)))
    c = GPTDataset(corpus, (0, 60), 50, GPTDatasetConfig(16, seed=7, cache_dir=str(tmp_path)))
    assert np.array_equal(a.shuffle_index, b.shuffle_index)
    assert not np.array_equal(a.document_index, c.document_index)


def test_indexing_errors(corpus, tmp_path):
    ds = GPTDataset(corpus, (0, 10), 5, GPTDatasetConfig(16, cache_dir=str(tmp_path)))
    assert np.array_equal(ds[-1], ds[4])
    with pytest.raises(IndexError):
        ds[5]


def test_bad_inputs(corpus, tmp_path):
    config = GPTDatasetConfig(16, cache_dir=str(tmp_path))
    with pytest.raises(MegaliteError, match="contains no tokens"):
        GPTDataset(corpus, (5, 5), 10, config, "test")
    with pytest.raises(MegaliteError, match="num_samples"):
        GPTDataset(corpus, (0, 5), 0, config)
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
               GPTDataset(corpus, (0, 49), 100, config)]:
        assert ds.index_built
    assert len(cache_files(cache)) == 15
    meta = [json.load(open(os.path.join(cache, f))) for f in os.listdir(cache) if f.endswith(".json")]
    assert {m["description"]["seed"] for m in meta} == {5, 6}
    assert all(m["description"]["idx"]["path"] == os.path.abspath(corpus.prefix + ".idx")
               for m in meta)


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
