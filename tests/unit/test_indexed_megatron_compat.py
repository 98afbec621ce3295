"""Byte compatibility with Megatron-LM's own MMIDIDX code (megatron-core 0.16.1, installed by
``make install`` as the test reference): both write the same bytes and read each other's files.
"""
import os
import warnings

import numpy as np
import pytest
import torch

from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder, merge_datasets

with warnings.catch_warnings():  # megatron-core warns that Apex / Transformer Engine are absent
    warnings.simplefilter("ignore")
    import megatron.core.datasets.indexed_dataset as mcore

# megatron-core's reader passes copy=False to an __array__ that numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def read_pair(prefix):
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


def random_shard(rng, dtype):
    hi = int(np.iinfo(dtype).max)
    docs = [[rng.integers(0, hi, size=int(rng.integers(0, 50))) for _ in range(int(rng.integers(1, 4)))]
            for _ in range(int(rng.integers(1, 30)))]
    modes = [[int(rng.integers(-128, 128)) for _ in doc] for doc in docs]
    return docs, modes


@pytest.mark.parametrize("multimodal", [False, True])
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_same_bytes_as_megatron_and_cross_readable(tmp_path, dtype, multimodal):
    rng = np.random.default_rng(7)
    ours, theirs = [], []
    for k in range(3):
        docs, modes = random_shard(rng, dtype)
        mp, op = str(tmp_path / f"megatron{k}"), str(tmp_path / f"ours{k}")
        mb = mcore.IndexedDatasetBuilder(mp + ".bin", dtype=dtype, multimodal=multimodal)
        with IndexedDatasetBuilder(op, dtype, multimodal=multimodal) as ob:
            for doc, m in zip(docs, modes):
                flat = np.concatenate(doc)
                mb.add_document(torch.from_numpy(flat), [len(s) for s in doc], modes=m if multimodal else None)
                ob.add_document(flat, [len(s) for s in doc], mode=m if multimodal else 0)
            ob.finalize()
        mb.finalize(mp + ".idx")
        assert read_pair(mp) == read_pair(op)
        theirs.append(mp)
        ours.append(op)
        if os.path.getsize(op + ".bin") == 0:
            continue  # Megatron's reader cannot map an empty .bin; ours can
        m_reader = mcore.IndexedDataset(op, multimodal=multimodal, mmap=True)
        o_reader = IndexedDataset(mp, multimodal=multimodal)
        assert len(m_reader) == len(o_reader)
        for i in range(len(o_reader)):
            got = m_reader[i][0] if multimodal else m_reader[i]
            np.testing.assert_array_equal(got, o_reader[i])
        np.testing.assert_array_equal(m_reader.document_indices, o_reader.document_indices)
        if multimodal:
            np.testing.assert_array_equal(m_reader.index.sequence_modes, o_reader.sequence_modes)

    mb = mcore.IndexedDatasetBuilder(str(tmp_path / "megatron_merged.bin"), dtype=dtype, multimodal=multimodal)
    for p in theirs:
        mb.add_index(p)
    mb.finalize(str(tmp_path / "megatron_merged.idx"))
    merge_datasets(ours, str(tmp_path / "ours_merged"), multimodal=multimodal)
    assert read_pair(str(tmp_path / "megatron_merged")) == read_pair(str(tmp_path / "ours_merged"))
