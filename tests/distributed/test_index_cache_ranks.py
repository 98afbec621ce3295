"""Index cache under torch.distributed: 3 gloo ranks build the same datasets at the same time.

Exactly one rank (global rank 0) may build each cache entry; every rank must then see the same
samples. A build failure on rank 0 must reach the other ranks as an error, not a hang.
"""
import hashlib
import os

import numpy as np
import pytest
from harness import DistributedWorkers

from megalite.errors import MegaliteError

WORLD = 3


def _write_corpus(prefix):
    from megalite.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for n in rng.integers(1, 200, size=300):
            b.add_document(rng.integers(0, 60000, size=n))
        b.finalize()


def build_on_every_rank(data_path, cache_dir):
    """Every rank builds train/valid/test at once; returns which it built and a digest of all
    samples."""
    import torch.distributed as dist

    from megalite.data.blended import build_train_valid_test_datasets

    dist.barrier()  # start together, so the ranks really race for the cache
    datasets = build_train_valid_test_datasets(data_path, "90,8,2", (400, 30, 5), 32, 11,
                                               cache_dir=cache_dir)
    built, digest = [], hashlib.sha256()
    for ds in datasets:
        parts = getattr(ds, "datasets", [ds])  # blended: its components
        built += [bool(p.index_built) for p in parts]
        for i in range(len(ds)):
            digest.update(ds[i].tobytes())
    return built, digest.hexdigest()


def fail_on_rank0(cache_dir):
    import torch.distributed as dist

    from megalite.data.index_cache import load_or_build

    def build():
        if dist.get_rank() == 0:
            raise RuntimeError("disk full (simulated)")
        return {"x": np.arange(3)}

    try:
        load_or_build(cache_dir, {"kind": "test-failure"}, ["x"], build)
    except MegaliteError as e:
        return f"MegaliteError: {e}"
    except RuntimeError as e:
        return f"RuntimeError: {e}"
    return "no error"


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(WORLD, timeout=120) as w:
        yield w


@pytest.mark.parametrize("blended", [False, True])
def test_one_build_and_identical_samples(workers, tmp_path, blended):
    prefix = str(tmp_path / "corpus")
    _write_corpus(prefix)
    if blended:
        other = str(tmp_path / "other")
        _write_corpus(other)
        data_path = ["0.4", prefix, "0.6", other]
    else:
        data_path = [prefix]
    cache = str(tmp_path / "cache")
    results = workers.run(build_on_every_rank, data_path, cache)
    built = np.array([b for b, _ in results])  # [rank, cache entry]
    assert built.shape[1] == (6 if blended else 3)
    assert built.sum(axis=0).tolist() == [1] * built.shape[1]  # each entry built exactly once
    assert built[0].all()  # ... by global rank 0
    assert len({d for _, d in results}) == 1  # every rank sees the same samples
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == built.shape[1]

    again = workers.run(build_on_every_rank, data_path, cache)
    assert not any(any(b) for b, _ in again)  # second time: everything loaded
    assert {d for _, d in again} == {results[0][1]}


def test_rank0_failure_reaches_every_rank(workers, tmp_path):
    outcome = workers.run(fail_on_rank0, str(tmp_path / "cache"))
    assert outcome[0] == "RuntimeError: disk full (simulated)"
    for text in outcome[1:]:
        assert text.startswith("MegaliteError: rank 0 failed") and "disk full" in text
