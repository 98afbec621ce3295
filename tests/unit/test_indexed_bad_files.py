"""Corrupt token files must fail on open with a DataFormatError that names the file.

Each case starts from a good dataset (sentence-split, so document_count != sequence_count + 1),
changes bytes at offsets taken from the spec, and checks the message. A hypothesis fuzz then flips
and truncates bytes at random: opening either fails cleanly or yields a dataset whose every
sequence and document reads inside the file (never a crash, an overflow or a stray exception).
"""
import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalite.errors import DataFormatError

# documents x sentences; 6 sequences, document index [0, 2, 3, 6]
DOCS = [[[1, 2, 3], [4]], [[5, 6]], [[7], [], [8, 9, 10, 11]]]
N, D = 6, 4
LEN_OFF = 34
PTR_OFF = LEN_OFF + 4 * N
DOC_OFF = PTR_OFF + 8 * N
IDX_SIZE = DOC_OFF + 8 * D


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("good") / "ds")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for doc in DOCS:
            for s in doc:
                b.add_item(s)
            b.end_document()
        b.finalize()
    assert os.path.getsize(prefix + ".idx") == IDX_SIZE
    return prefix


@pytest.fixture
def copy(good, tmp_path):
    """A fresh copy of the good dataset; returns its prefix."""
    prefix = str(tmp_path / "bad")
    for ext in (".bin", ".idx"):
        shutil.copyfile(good + ext, prefix + ext)
    return prefix


def patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def append(path, data: bytes):
    with open(path, "ab") as f:
        f.write(data)


def expect_error(prefix, ext, pattern, multimodal=False):
    with pytest.raises(DataFormatError, match=pattern) as err:
        IndexedDataset(prefix, multimodal=multimodal)
    assert prefix + ext in str(err.value), str(err.value)


def test_good_copy_opens(copy):
    ds = IndexedDataset(copy)
    assert ds.document_indices.tolist() == [0, 2, 3, 6] and ds.document(2).tolist() == [7, 8, 9, 10, 11]


@pytest.mark.parametrize("ext", [".idx", ".bin"])
def test_missing_file(copy, ext):
    os.unlink(copy + ext)
    expect_error(copy, ext, "missing")


@pytest.mark.parametrize("corrupt,pattern", [
    (lambda p: patch(p, 0, b"MMIDIDY"), "not an MMIDIDX index"),
    (lambda p: patch(p, 0, b"\x00" * 9), "not an MMIDIDX index"),
    (lambda p: patch(p, 9, struct.pack("<Q", 2)), "unsupported version 2"),
    (lambda p: patch(p, 9, struct.pack("<Q", 0)), "unsupported version 0"),
    (lambda p: patch(p, 17, b"\x09"), "unknown dtype code 9"),
    (lambda p: patch(p, 17, b"\x00"), "unknown dtype code 0"),
    (lambda p: truncate(p, 0), r"truncated header \(0 bytes"),
    (lambda p: truncate(p, 20), r"truncated header \(20 bytes"),
    (lambda p: truncate(p, IDX_SIZE - 1), "truncated: the header promises 6 sequences"),
    (lambda p: truncate(p, DOC_OFF), "truncated"),
    (lambda p: patch(p, 18, struct.pack("<Q", N + 1000)), "truncated: the header promises 1006 sequences"),
    (lambda p: patch(p, 18, struct.pack("<Q", 2**64 - 1)), "truncated"),  # no overflow wrap-around
    (lambda p: patch(p, 26, struct.pack("<Q", 2**63)), "truncated"),
    (lambda p: append(p, b"\x00" * 3), "3 bytes of trailing garbage"),
    (lambda p: append(p, b"junk" * 10), "40 bytes of trailing garbage"),
    (lambda p: append(p, b"\x01" * N), "multimodal=True"),  # exactly a modes array: say so
    (lambda p: patch(p, PTR_OFF + 8 * 2, struct.pack("<q", 9)), "sequence pointer 2 is 9, inconsistent"),
    (lambda p: patch(p, PTR_OFF + 8 * 5, struct.pack("<q", -2)), "sequence pointer 5 is -2"),
    (lambda p: patch(p, PTR_OFF, struct.pack("<q", 2)), "pointers must start at 0, got 2"),
    (lambda p: patch(p, LEN_OFF + 4 * 3, struct.pack("<i", -1)), "sequence 3 has negative length -1"),
    (lambda p: patch(p, DOC_OFF, struct.pack("<q", 1)), "document index must start at 0, got 1"),
    (lambda p: patch(p, DOC_OFF + 8 * 3, struct.pack("<q", 5)), "must end at sequence_count 6, got 5"),
    (lambda p: patch(p, DOC_OFF + 8 * 3, struct.pack("<q", 2**62)), "must end at sequence_count 6"),
    (lambda p: patch(p, DOC_OFF + 8 * 1, struct.pack("<q", 4)), r"decreases at entry 2 \(4 -> 3\)"),
    (lambda p: patch(p, DOC_OFF + 8 * 1, struct.pack("<q", -7)), r"decreases at entry 1 \(0 -> -7\)"),
])
def test_corrupt_index(copy, corrupt, pattern):
    corrupt(copy + ".idx")
    expect_error(copy, ".idx", pattern)


def test_zero_document_count(copy):
    # A header claiming no document-index entries (file shortened to match) is still rejected.
    patch(copy + ".idx", 26, struct.pack("<Q", 0))
    truncate(copy + ".idx", DOC_OFF)
    expect_error(copy, ".idx", "empty document index")


def test_non_multimodal_file_opened_as_multimodal(copy):
    expect_error(copy, ".idx", "truncated.*with modes", multimodal=True)


@pytest.mark.parametrize("corrupt,pattern", [
    (lambda p: truncate(p, 21), "21 bytes, but the index describes 11 tokens of uint16 \\(22 bytes\\)"),
    (lambda p: truncate(p, 20), "20 bytes"),
    (lambda p: truncate(p, 0), "0 bytes"),
    (lambda p: append(p, b"\x00\x00"), "24 bytes"),
])
def test_bin_size_mismatch(copy, corrupt, pattern):
    corrupt(copy + ".bin")
    expect_error(copy, ".bin", pattern)


def test_wrong_dtype_code_is_caught_by_the_bin_size(copy):
    patch(copy + ".idx", 17, b"\x04")  # int32: the .bin would need 44 bytes
    expect_error(copy, ".bin", "11 tokens of int32")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, IDX_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, IDX_SIZE)), bin_cut=st.one_of(st.none(), st.integers(0, 22)))
def test_fuzzed_files_fail_cleanly_or_read_in_bounds(good, tmp_path_factory, edits, cut, bin_cut):
    prefix = str(tmp_path_factory.mktemp("fuzz") / "ds")
    for ext in (".bin", ".idx"):
        shutil.copyfile(good + ext, prefix + ext)
    for offset, value in edits:
        patch(prefix + ".idx", offset, bytes([value]))
    if cut is not None:
        truncate(prefix + ".idx", cut)
    if bin_cut is not None:
        truncate(prefix + ".bin", bin_cut)
    try:
        ds = IndexedDataset(prefix)
    except DataFormatError as e:
        assert prefix in str(e)
        return
    # It opened: then every read must stay inside the .bin and agree with the index.
    total = 0
    for i in range(len(ds)):
        assert len(ds[i]) == ds.sequence_lengths[i] >= 0
        total += len(ds[i])
    assert total == ds.num_tokens == os.path.getsize(prefix + ".bin") // ds.dtype.itemsize
    for d in range(ds.num_documents):
        assert len(ds.document(d)) == sum(len(ds[i]) for i in ds.document_sequences(d))
