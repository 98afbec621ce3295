"""MMIDIDX builder/reader against the spec (shared/spec/indexed-dataset.md), byte for byte.

The test carries its own tiny writer and reader of the spec, built on ``struct`` only, so the C++
builder and the numpy reader are checked against an independent implementation, not against
themselves. All comparisons are exact (bytes or integer arrays): the format has no tolerance.
"""
import gc
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megalite.data.indexed import (CODE_TO_DTYPE, DTYPE_TO_CODE, IndexedDataset, IndexedDatasetBuilder,
                                   best_dtype, data_file_path, dataset_exists, index_file_path, merge_datasets)
from megalite.errors import DataFormatError, MegaliteError

SPEC_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
STRUCT_CHAR = {"uint16": "H", "int32": "i", "uint8": "B", "int64": "q"}


# -- an independent implementation of the spec ----------------------------------------------------

def spec_write(docs, dtype: str, modes=None):
    """(bin bytes, idx bytes) for ``docs``: a list of documents, each a list of sequences (int lists).
    ``modes``: None, or one int8 per sequence in order (multimodal)."""
    item = struct.calcsize("<" + STRUCT_CHAR[dtype])
    seqs = [s for doc in docs for s in doc]
    bin_bytes = b"".join(struct.pack(f"<{len(s)}{STRUCT_CHAR[dtype]}", *s) for s in seqs)
    lengths = [len(s) for s in seqs]
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * item
    doc_index = [0]
    for doc in docs:
        doc_index.append(doc_index[-1] + len(doc))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, SPEC_CODES[dtype], len(seqs), len(doc_index))
    idx += struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_index)}q", *doc_index)
    if modes is not None:
        idx += struct.pack(f"<{len(modes)}b", *modes)
    return bin_bytes, idx


def spec_read_index(data: bytes, multimodal: bool = False) -> dict:
    assert data[:9] == b"MMIDIDX\x00\x00"
    version, code, n, d = struct.unpack_from("<QBQQ", data, 9)
    off = 34
    lengths = list(struct.unpack_from(f"<{n}i", data, off)); off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", data, off)); off += 8 * n
    doc_index = list(struct.unpack_from(f"<{d}q", data, off)); off += 8 * d
    modes = None
    if multimodal:
        modes = list(struct.unpack_from(f"<{n}b", data, off)); off += n
    assert off == len(data), "no padding and nothing after the last array"
    return dict(version=version, code=code, n=n, d=d, lengths=lengths, pointers=pointers,
                doc_index=doc_index, modes=modes)


def read_pair(prefix):
    with open(data_file_path(prefix), "rb") as f:
        b = f.read()
    with open(index_file_path(prefix), "rb") as f:
        i = f.read()
    return b, i


def random_docs(rng, n_docs, dtype, max_sentences=1, max_len=50):
    hi = np.iinfo(dtype).max
    lo = np.iinfo(dtype).min
    return [[rng.integers(lo, hi, size=int(rng.integers(0, max_len)), endpoint=True).tolist()
             for _ in range(int(rng.integers(1, max_sentences + 1)))] for _ in range(n_docs)]


def build(prefix, docs, dtype, multimodal=False, modes=None, style="document"):
    """Builds ``docs`` with the C++ builder; ``style`` picks the API: "document" (add_document with
    sentence lengths), "item" (add_item + end_document) or "bulk" (runs of single-sentence
    documents with equal modes through add_documents, the rest through add_document)."""
    seq_modes = list(modes or [0] * sum(len(d) for d in docs))
    pos, batch, batch_mode = 0, [], None
    with IndexedDatasetBuilder(prefix, dtype, multimodal=multimodal) as b:
        def flush():
            if batch:
                b.add_documents(np.concatenate([np.array(s, np.int64) for s in batch]), [len(s) for s in batch],
                                mode=batch_mode)
                batch.clear()

        for doc in docs:
            m = seq_modes[pos:pos + len(doc)]
            pos += len(doc)
            if style == "bulk" and len(doc) == 1 and (not batch or m[0] == batch_mode):
                batch.append(doc[0])
                batch_mode = m[0]
                continue
            flush()
            if style == "bulk" and len(doc) == 1:
                batch.append(doc[0])
                batch_mode = m[0]
            elif style == "item":
                for s, mode in zip(doc, m):
                    b.add_item(s, mode=mode)
                b.end_document()
            else:
                flat = np.array([t for s in doc for t in s], dtype=np.int64)
                b.add_document(flat, [len(s) for s in doc], mode=m)
        flush()
        b.finalize()


# -- byte-level ---------------------------------------------------------------------------------

def test_dtype_tables_and_naming():
    assert {str(k): v for k, v in DTYPE_TO_CODE.items()} == SPEC_CODES
    assert all(DTYPE_TO_CODE[CODE_TO_DTYPE[c]] == c for c in CODE_TO_DTYPE)
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.int32 and best_dtype(32000) == np.uint16
    assert data_file_path("a/b") == "a/b.bin" and index_file_path("a/b") == "a/b.idx"


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_whole_documents_byte_level(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=int(rng.integers(1, 300))) for _ in range(40)]
    info = np.iinfo(dtype)
    docs.append(np.array([info.max, info.min, 0, 1]))  # extremes of the dtype survive
    prefix = str(tmp_path / "ds")
    assert not dataset_exists(prefix)
    with IndexedDatasetBuilder(prefix, np.dtype(dtype)) as b:
        for d in docs:
            b.add_document(d)
        b.finalize()
    assert dataset_exists(prefix)
    bin_bytes, idx = read_pair(prefix)
    assert bin_bytes == np.concatenate(docs).astype(dtype).tobytes()
    h = spec_read_index(idx)
    item = np.dtype(dtype).itemsize
    lengths = [len(d) for d in docs]
    assert (h["version"], h["code"], h["n"], h["d"]) == (1, SPEC_CODES[dtype], len(docs), len(docs) + 1)
    assert h["lengths"] == lengths
    assert h["pointers"] == [item * int(x) for x in np.concatenate([[0], np.cumsum(lengths)[:-1]])]
    assert h["doc_index"] == list(range(len(docs) + 1))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype) and len(ds) == ds.num_documents == len(docs)
    assert ds.num_tokens == sum(lengths)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.document(i), d)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temporaries left


@pytest.mark.parametrize("style", ["document", "item", "bulk"])
def test_sentence_split_documents(tmp_path, style):
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 25, np.uint16, max_sentences=5)
    docs.append([[]])  # a document holding one empty sentence
    prefix = str(tmp_path / "sent")
    build(prefix, docs, np.uint16, style=style)
    assert read_pair(prefix) == spec_write(docs, "uint16")
    h = spec_read_index(read_pair(prefix)[1])
    assert h["d"] == len(docs) + 1 and h["n"] == sum(len(d) for d in docs) > len(docs)
    ds = IndexedDataset(prefix)
    seqs = [s for d in docs for s in d]
    for i, s in enumerate(seqs):
        assert ds[i].tolist() == s
    for k, d in enumerate(docs):
        assert ds.document(k).tolist() == [t for s in d for t in s]
        assert [ds[i].tolist() for i in ds.document_sequences(k)] == d


def test_multimodal_modes_trail_the_index(tmp_path):
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 10, np.int32, max_sentences=3)
    n = sum(len(d) for d in docs)
    modes = [int(x) for x in rng.integers(-128, 128, size=n)]
    prefix = str(tmp_path / "mm")
    build(prefix, docs, np.int32, multimodal=True, modes=modes, style="document")
    assert read_pair(prefix) == spec_write(docs, "int32", modes)
    assert spec_read_index(read_pair(prefix)[1], multimodal=True)["modes"] == modes
    ds = IndexedDataset(prefix, multimodal=True)
    assert ds.sequence_modes.tolist() == modes
    assert IndexedDataset(str(tmp_path / "mm"), multimodal=True).sequence_modes.dtype == np.int8
    # One mode for a whole document applies to each of its sentences.
    with IndexedDatasetBuilder(str(tmp_path / "one"), np.uint16, multimodal=True) as b:
        b.add_document([1, 2, 3], [1, 2], mode=5)
        b.finalize()
    assert IndexedDataset(str(tmp_path / "one"), multimodal=True).sequence_modes.tolist() == [5, 5]


def test_input_kinds_give_identical_bytes(tmp_path):
    """Lists, every integer dtype, strided views and torch tensors all write the same bytes."""
    doc = np.array([0, 5, 300, 65535, 7], dtype=np.int64)
    variants = [doc.tolist(), doc.astype(np.uint16), doc.astype(np.uint64), doc.astype(np.int32),
                np.stack([doc, doc], axis=1)[:, 0], torch.tensor(doc), np.array([], np.int64)]
    expected = None
    for k, v in enumerate(variants[:-1]):
        prefix = str(tmp_path / f"v{k}")
        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document(v)
            b.add_document([])  # an empty document (one empty sequence)
            b.finalize()
        got = read_pair(prefix)
        expected = expected or got
        assert got == expected == spec_write([[doc.tolist()], [[]]], "uint16")


def test_documents_larger_than_the_write_buffer(tmp_path):
    """5M int32 tokens (20 MB) cross the C++ 8 MiB buffer boundary at odd places."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(-2**31, 2**31, size=n, dtype=np.int64) for n in (3, 5_000_000, 1_234_567, 1)]
    prefix = str(tmp_path / "big")
    with IndexedDatasetBuilder(prefix, np.int32) as b:
        for d in docs:
            b.add_document(d)
        b.finalize()
    assert read_pair(prefix)[0] == np.concatenate(docs).astype(np.int32).tobytes()


# -- property: C++ builder == spec writer --------------------------------------------------------

def _docs_strategy(dtype):
    info = np.iinfo(dtype)
    sentence = st.lists(st.integers(int(info.min), int(info.max)), max_size=12)
    return st.lists(st.lists(sentence, min_size=0, max_size=4), max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), dtype=st.sampled_from(["uint16", "int32"]), multimodal=st.booleans())
def test_builder_matches_spec_writer(tmp_path_factory, data, dtype, multimodal):
    docs = data.draw(_docs_strategy(dtype))
    n = sum(len(d) for d in docs)
    modes = data.draw(st.lists(st.integers(-128, 127), min_size=n, max_size=n)) if multimodal else None
    style = data.draw(st.sampled_from(["document", "item", "bulk"]))
    prefix = str(tmp_path_factory.mktemp("prop") / "ds")
    build(prefix, docs, np.dtype(dtype), multimodal=multimodal, modes=modes, style=style)
    assert read_pair(prefix) == spec_write(docs, dtype, modes)
    ds = IndexedDataset(prefix, multimodal=multimodal)
    assert ds.num_documents == len(docs) and len(ds) == n
    for k, d in enumerate(docs):
        assert ds.document(k).tolist() == [t for s in d for t in s]
        assert [ds[i].tolist() for i in ds.document_sequences(k)] == d
    if multimodal:
        assert ds.sequence_modes.tolist() == modes


# -- merge --------------------------------------------------------------------------------------

@pytest.mark.parametrize("multimodal", [False, True])
def test_merge_equals_building_at_once(tmp_path, multimodal):
    rng = np.random.default_rng(4)
    shards = [random_docs(rng, k, np.uint16, max_sentences=3) for k in (7, 0, 12, 1)]
    all_docs = [d for s in shards for d in s]
    n_per = [sum(len(d) for d in s) for s in shards]
    modes = [int(x) for x in rng.integers(-128, 128, size=sum(n_per))] if multimodal else None
    prefixes, pos = [], 0
    for k, s in enumerate(shards):
        prefixes.append(str(tmp_path / f"shard{k}"))
        build(prefixes[-1], s, np.uint16, multimodal, modes[pos:pos + n_per[k]] if modes else None)
        pos += n_per[k]
    build(str(tmp_path / "whole"), all_docs, np.uint16, multimodal, modes)
    merge_datasets(prefixes, str(tmp_path / "merged"), multimodal=multimodal)
    assert read_pair(tmp_path / "merged") == read_pair(tmp_path / "whole") == spec_write(all_docs, "uint16", modes)

    # add_index interleaved with ordinary documents is the same as building those documents directly.
    with IndexedDatasetBuilder(str(tmp_path / "mixed"), np.uint16, multimodal=multimodal) as b:
        b.add_document([1, 2, 3], mode=1 if multimodal else 0)
        b.add_index(prefixes[0])
        b.add_document([4], mode=2 if multimodal else 0)
        b.finalize()
    mixed = [[[1, 2, 3]]] + shards[0] + [[[4]]]
    mixed_modes = [1] + modes[:n_per[0]] + [2] if multimodal else None
    assert read_pair(tmp_path / "mixed") == spec_write(mixed, "uint16", mixed_modes)


def test_merge_rejects_mismatched_dtypes_and_open_documents(tmp_path):
    build(str(tmp_path / "a"), [[[1, 2]]], np.uint16)
    build(str(tmp_path / "b"), [[[3]]], np.int32)
    with pytest.raises(DataFormatError, match=r"b\.idx.*int32.*a\.idx.*uint16.*dtypes must agree"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    with pytest.raises(DataFormatError, match="does not match"):
        with IndexedDatasetBuilder(str(tmp_path / "out"), np.int32) as b:
            b.add_index(str(tmp_path / "a"))
    with pytest.raises(DataFormatError, match="still open"):
        with IndexedDatasetBuilder(str(tmp_path / "out"), np.uint16) as b:
            b.add_item([5])
            b.add_index(str(tmp_path / "a"))
    with pytest.raises(MegaliteError, match="no input"):
        merge_datasets([], str(tmp_path / "out"))
    with pytest.raises(DataFormatError, match=r"missing\.idx: missing"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "missing")], str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]


# -- atomicity ----------------------------------------------------------------------------------

def test_exception_inside_builder_leaves_no_files_and_keeps_old_dataset(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(ZeroDivisionError):
        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document(np.arange(100_000) % 1000)
            1 / 0
    assert os.listdir(tmp_path) == []
    build(prefix, [[[1, 2, 3]]], np.uint16)
    good = read_pair(prefix)
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document([9, 9])
            raise RuntimeError("interrupted")
    assert read_pair(prefix) == good and sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    # A finalized builder refuses more work, and abort() after finalize keeps the published files.
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b.add_document([4])
    b.finalize()
    with pytest.raises(MegaliteError, match="already finalized"):
        b.finalize()
    b.abort()  # a no-op after finalize
    assert read_pair(prefix) == spec_write([[[4]]], "uint16")


def test_unfinalized_builder_cleans_up_when_collected(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "gone"), np.int32)
    b.add_document([1, 2, 3])
    assert len(os.listdir(tmp_path)) == 1  # the temporary .bin, under a non-final name
    assert not dataset_exists(str(tmp_path / "gone"))
    del b
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_rejected_input_leaves_builder_usable(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([1, 2])
        with pytest.raises(DataFormatError):
            b.add_document([3, 70000, 4])
        with pytest.raises(DataFormatError):
            b.add_document([3, 4], [1, 2])
        b.add_document([5])
        assert (b.sequence_count, b.document_count, b.num_tokens) == (2, 2, 3)
        b.finalize()
    assert read_pair(prefix) == spec_write([[[1, 2]], [[5]]], "uint16")


# -- reader API ---------------------------------------------------------------------------------

def test_reader_views_slices_and_pickling(tmp_path):
    docs = [[[10, 11, 12, 13], [14]], [[20, 21]], [], [[30]]]
    prefix = str(tmp_path / "ds")
    build(prefix, docs, np.int32)
    ds = IndexedDataset(prefix)
    assert ds.get(0, 1, 2).tolist() == [11, 12] and ds.get(0, 2).tolist() == [12, 13]
    assert ds.get(0, 4, 0).tolist() == [] and ds[-1].tolist() == [30]
    assert [s.tolist() for s in ds[1:3]] == [[14], [20, 21]]
    assert ds.document(2).tolist() == [] and ds.document(-1).tolist() == [30]
    assert ds.document_indices.tolist() == [0, 2, 3, 3, 4] and ds.num_documents == 4
    view = ds.get(0, 1, 2)
    assert not view.flags.owndata and not view.flags.writeable  # a view into the read-only map
    assert np.shares_memory(view, ds.document(0))
    for bad in (lambda: ds[4], lambda: ds[-5], lambda: ds.get(0, 3, 2), lambda: ds.get(0, -1, 1),
                lambda: ds.document(4)):
        with pytest.raises(IndexError, match="out of range"):
            bad()
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 200  # the arrays are re-mapped, not pickled
    assert [clone[i].tolist() for i in range(len(clone))] == [ds[i].tolist() for i in range(len(ds))]
    assert clone.num_tokens == ds.num_tokens == 8


def test_empty_dataset_round_trips(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.finalize()
    assert read_pair(prefix) == spec_write([], "uint16") and os.path.getsize(prefix + ".bin") == 0
    ds = IndexedDataset(prefix)
    assert len(ds) == ds.num_documents == ds.num_tokens == 0
    assert len(pickle.loads(pickle.dumps(ds))) == 0


def test_finalize_closes_an_open_document(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_item([1])
        b.add_item([2, 3])
        b.finalize()
    assert read_pair(prefix) == spec_write([[[1], [2, 3]]], "uint16")
