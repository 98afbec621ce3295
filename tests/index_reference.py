"""Plain-Python/numpy twins of the C++ index builders in ``csrc/index_helpers.cpp`` (a test oracle).

Each function here returns exactly what its ``megalite._C`` namesake returns (same values, same
dtype, same shape); the tests compare the two on random inputs, and the benchmark can use these
as a second baseline. They are written to be obviously correct, not fast:

* the shuffles *are* ``numpy.random.RandomState.shuffle`` (the definition the C++ reproduces);
* the sample index is computed by a different method from the C++ loop: each row is located by
  a binary search for the sample's last token in the cumulative sequence lengths;
* the blending rules are written out step by step on Python floats.
"""
from __future__ import annotations

import numpy as np


def build_document_index(begin: int, end: int, num_epochs: int, separate_final_epoch: bool,
                         rng: np.random.RandomState) -> np.ndarray:
    """int32 ``[(end - begin) * num_epochs]``: ids ``begin..end-1`` tiled ``num_epochs`` times and
    shuffled by ``rng``; with ``separate_final_epoch`` the first ``num_epochs - 1`` copies are
    shuffled together, then the last copy alone."""
    if separate_final_epoch and num_epochs < 2:
        raise ValueError("separate_final_epoch needs num_epochs >= 2")
    epoch = np.arange(begin, end, dtype=np.int32)
    if not separate_final_epoch:
        ids = np.tile(epoch, num_epochs)
        rng.shuffle(ids)
        return ids
    head, tail = np.tile(epoch, num_epochs - 1), epoch.copy()
    rng.shuffle(head)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples: int, add_extra_token: bool, allow_partial: bool) -> np.ndarray:
    """int64 ``[num_samples + 1, 2]``. With x = add_extra_token, sample i covers stream positions
    ``[i*seq_length, i*seq_length + seq_length + x)``; row i+1 is (row of ``document_index``
    holding the sample's last token q, q's offset in that row + 1 - x). Row 0 is ``(0, 0)``.
    A sample past the end of the stream (only with ``allow_partial``) gets (last row, its length
    - x)."""
    x = int(add_extra_token)
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index, dtype=np.int64)]
    ends = np.cumsum(lengths)  # ends[r]: stream position just past row r
    total = int(ends[-1]) if len(ends) else 0
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    for i in range(1, num_samples + 1):
        last = i * seq_length + x - 1  # the last token of sample i - 1
        if last >= total:
            if not allow_partial or not len(ends):
                raise ValueError("the document index holds fewer than num_samples samples")
            out[i] = (len(ends) - 1, lengths[-1] - x)
            continue
        # The row holding `last` is the first whose end lies beyond it (empty rows never do).
        row = int(np.searchsorted(ends, last, side="right"))
        out[i] = (row, last - int(ends[row] - lengths[row]) + 1 - x)
    return out


def build_shuffle_index(total: int, first: int, rng: np.random.RandomState) -> np.ndarray:
    """int64 ``[total]``: ``[0, first)`` shuffled by ``rng``, then ``[first, total)``."""
    head, tail = np.arange(first, dtype=np.int64), np.arange(first, total, dtype=np.int64)
    rng.shuffle(head)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def build_blending_index(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(int16 ``[size]`` dataset id, int64 ``[size]`` sample within that dataset), by Tijdeman's
    chairman-assignment rule (the full statement is in ``csrc/index_helpers.cpp``).

    With K positive weights and ``delta = 1 / (2K - 2)`` (0 if K == 1), at step t = 1, 2, ...
    the datasets with ``w * t - drawn >= delta`` are eligible and the one with the smallest
    ``(drawn + 1 - delta) / w`` is drawn (lowest k on ties; if none is eligible, the largest
    ``w * t - drawn``). Python floats are IEEE doubles, rounded exactly as in C++."""
    weights = [float(w) for w in weights]
    if not weights or any(not np.isfinite(w) or w < 0 for w in weights) or max(weights) == 0:
        raise ValueError("weights must be finite, >= 0 and not all 0")
    positive = sum(1 for w in weights if w > 0)
    delta = 1.0 / (2 * positive - 2) if positive > 1 else 0.0
    drawn = [0] * len(weights)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    for t in range(1, size + 1):
        eligible = [k for k, w in enumerate(weights) if w > 0 and w * t - drawn[k] >= delta]
        if eligible:
            deadlines = [(drawn[k] + 1 - delta) / weights[k] for k in eligible]
            best = eligible[deadlines.index(min(deadlines))]
        else:
            deficits = [w * t - c for w, c in zip(weights, drawn)]
            best = deficits.index(max(deficits))
        dataset_index[t - 1] = best
        sample_index[t - 1] = drawn[best]
        drawn[best] += 1
    return dataset_index, sample_index


def build_blending_index_megatron(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy rule: row r draws the dataset with the largest
    ``w * max(r, 1) - drawn`` (the first such k on ties)."""
    weights = [float(w) for w in weights]
    drawn = [0] * len(weights)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    for r in range(size):
        errors = [w * float(max(r, 1)) - c for w, c in zip(weights, drawn)]
        best = errors.index(max(errors))
        dataset_index[r] = best
        sample_index[r] = drawn[best]
        drawn[best] += 1
    return dataset_index, sample_index
