"""BatchIterator's lean paths: per-stage fields and the prefetched next global batch.

Exact comparisons (``torch.equal``): both paths read the same samples and stack them the same
way, so any difference is a bug, not rounding.
"""
from __future__ import annotations

import numpy as np
import torch

from megalite.data.batches import BatchIterator


class CountingDataset:
    """GPT-style samples (``s + 1`` token ids, a function of the index) that count reads."""

    def __init__(self, n: int = 50, s: int = 6):
        self.n, self.s, self.reads = n, s, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        self.reads += 1
        return (np.arange(self.s + 1, dtype=np.int64) * 7 + i * 13) % 101


def _batches(it: BatchIterator, k: int) -> list[list[dict]]:
    return [it.next_global_batch() for _ in range(k)]


def _equal(a: list[list[dict]], b: list[list[dict]]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[f], y[f]) for f in x)
               for ga, gb in zip(a, b, strict=True) for x, y in zip(ga, gb, strict=True))


def test_prefetched_batches_equal_plain_ones():
    plain = _batches(BatchIterator(CountingDataset(), 8, 2, 2, 1), 5)
    ahead = BatchIterator(CountingDataset(), 8, 2, 2, 1, prefetch=True)
    got = _batches(ahead, 5)
    assert _equal(got, plain)
    assert ahead.consumed_samples == 40
    assert ahead._next is not None and ahead._next[0] == 40   # the sixth is on its way


def test_prefetched_batch_is_dropped_when_the_position_moves():
    ref = BatchIterator(CountingDataset(), 8, 2, 2, 0)
    it = BatchIterator(CountingDataset(), 8, 2, 2, 0, prefetch=True)
    it.next_global_batch()                 # prefetches samples 8..15
    it.consumed_samples = 24               # a resume or an evaluation moved the position
    ref.consumed_samples = 24
    assert _equal([it.next_global_batch()], [ref.next_global_batch()])


def test_stage_fields():
    full = _batches(BatchIterator(CountingDataset(), 8, 2, 1, 0), 2)
    first = _batches(BatchIterator(CountingDataset(), 8, 2, 1, 0, fields=("tokens",)), 2)
    last = _batches(BatchIterator(CountingDataset(), 8, 2, 1, 0, fields=("labels",)), 2)
    for gf, g1, g2 in zip(full, first, last):
        for f, a, b in zip(gf, g1, g2):
            assert list(a) == ["tokens"] and torch.equal(a["tokens"], f["tokens"])
            assert list(b) == ["labels"] and torch.equal(b["labels"], f["labels"])
    middle_data = CountingDataset()
    middle = _batches(BatchIterator(middle_data, 8, 2, 1, 0, fields=()), 2)
    assert middle == [[{}] * 4] * 2 and middle_data.reads == 0   # a middle stage reads nothing
