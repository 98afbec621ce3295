"""Plain-Python twins of the C++ index builders in ``csrc/index_helpers.cpp``.

Each function here returns exactly what its ``megalite._C`` namesake returns (same values, same
dtype, same shape); the tests compare the two on random inputs, and the benchmark uses these as
the baseline. They are written to be obviously correct, not fast: the PRNG works on Python
integers, and the sample index is computed by a *different* method from the C++ loop (locating
each sample's first token in the cumulative document lengths), so agreement is a real check.

The randomness (defined once, identically in C++):

* PRNG: splitmix64. ``state += 0x9E3779B97F4A7C15`` (mod 2^64), output = finaliser(state).
  The state starts at the seed.
* Bounded draw in ``[0, n)``: Lemire's multiply-shift with rejection (unbiased): ``m = x * n``;
  while ``m mod 2^64 < (2^64 - n) mod n`` draw a new ``x``; the result is ``m >> 64``.
* Shuffle: Fisher-Yates from the back, ``for i = n-1 .. 1: swap(a[i], a[bounded(i + 1)])``.
"""
from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


class SplitMix64:
    """splitmix64 generator on Python integers (see the module docstring)."""

    def __init__(self, seed: int):
        self.state = seed & _MASK

    def next(self) -> int:
        """The next 64-bit output."""
        self.state = (self.state + _GAMMA) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Uniform integer in ``[0, n)`` for ``n >= 1`` (Lemire's method, unbiased)."""
        m = self.next() * n
        threshold = ((1 << 64) - n) % n
        while (m & _MASK) < threshold:
            m = self.next() * n
        return m >> 64


def shuffle(values: list, rng: SplitMix64) -> None:
    """Fisher-Yates shuffle of ``values`` in place, from the back."""
    for i in range(len(values) - 1, 0, -1):
        j = rng.below(i + 1)
        values[i], values[j] = values[j], values[i]


def splitmix64_outputs(seed: int, count: int, bound: int = 0) -> np.ndarray:
    """First ``count`` outputs (``bound == 0``) or bounded draws in ``[0, bound)``; uint64."""
    rng = SplitMix64(seed)
    return np.array([rng.next() if bound == 0 else rng.below(bound) for _ in range(count)],
                    dtype=np.uint64)


def build_document_index(begin: int, end: int, num_epochs: int, separate_final_epoch: bool,
                         seed: int) -> np.ndarray:
    """int32 ``[(end - begin) * num_epochs]``: ids ``begin..end-1`` tiled ``num_epochs`` times and
    shuffled; with ``separate_final_epoch`` the first ``num_epochs - 1`` copies are shuffled
    together, then the last copy alone, with the same generator continuing."""
    if separate_final_epoch and num_epochs < 2:
        raise ValueError("separate_final_epoch needs num_epochs >= 2")
    epoch = list(range(begin, end))
    rng = SplitMix64(seed)
    if separate_final_epoch:
        head, tail = epoch * (num_epochs - 1), list(epoch)
        shuffle(head, rng)
        shuffle(tail, rng)
        ids = head + tail
    else:
        ids = epoch * num_epochs
        shuffle(ids, rng)
    return np.array(ids, dtype=np.int32)


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples: int) -> np.ndarray:
    """int64 ``[num_samples + 1, 2]``: row ``i`` = (row of ``document_index``, token offset) of
    token ``i * seq_length`` in the stream of documents read in ``document_index`` order; row 0
    is ``(0, 0)`` by convention (even when the first document is empty).

    Sample ``i`` is tokens ``i*seq_length .. (i+1)*seq_length`` inclusive of that stream."""
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index, dtype=np.int64)]
    ends = np.cumsum(lengths)  # ends[r]: stream position just past document row r
    if num_samples > 0 and num_samples * seq_length >= (int(ends[-1]) if len(ends) else 0):
        raise ValueError("the document index holds fewer than num_samples samples")
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    for i in range(1, num_samples + 1):
        position = i * seq_length
        # The row holding `position` is the first whose end lies beyond it (empty rows never do).
        row = int(np.searchsorted(ends, position, side="right"))
        start = int(ends[row] - lengths[row])
        out[i] = (row, position - start)
    return out


def build_shuffle_index(num_samples: int, first: int, seed: int) -> np.ndarray:
    """int64 ``[num_samples]``: permutation of the sample ids; ``[0, first)`` and
    ``[first, num_samples)`` shuffled separately with the same generator continuing."""
    rng = SplitMix64(seed)
    head, tail = list(range(first)), list(range(first, num_samples))
    shuffle(head, rng)
    shuffle(tail, rng)
    return np.array(head + tail, dtype=np.int64)


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
