"""Blending several GPT datasets by weight, and the train/valid/test builder the trainer calls.

Blending rule (``megalite._C.build_blending_index``, stated in full in ``csrc/index_helpers.cpp``):
weights are normalised to sum to 1, and the datasets are interleaved by Tijdeman's solution of the
chairman assignment problem: after every step t, each dataset's count is within ``1 - 1/(2K-2)``
(< 1) of its ideal share ``w[k] * t`` (K positive weights). In short: among the datasets at least
``1/(2K-2)`` behind their share, draw the one whose next sample is due soonest. (Megatron's
greedy "largest ``w * t - drawn``" rule can fall more than one behind with three or more
datasets.) Dataset k's samples are taken in order 0, 1, 2, ... The index is deterministic (no
seed) and cheap (O(size * datasets) in C++), so it is computed, not cached.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from megalite import _C
from megalite.data.gpt_dataset import (SPLIT_NAMES, GPTDataset, GPTDatasetConfig, parse_split,
                                       split_document_ranges)
from megalite.data.token_range import check_token_ids
from megalite.errors import MegaliteError

# Each component is sized this much above its exact share (Megatron uses the same 0.5%), and
# at least as large as the blending index actually draws from it.
SIZE_MARGIN = 1.005


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """``["0.3", "a", "0.7", "b"]`` -> (["a", "b"], [0.3, 0.7]); ``["a", "b"]`` -> (..., None).

    Items may also hold several whitespace-separated words (``["0.3 a 0.7 b"]``). Weights are
    returned as given (not normalised); None means "weight each prefix by its token count"."""
    words = [w for item in data_path for w in str(item).split()]
    if not words:
        raise MegaliteError("--data-path: no dataset prefix given")
    numeric = [_is_number(w) for w in words]
    if not any(numeric):
        return words, None
    if len(words) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise MegaliteError(f"--data-path {' '.join(words)!r}: give either prefixes only, or "
                            "'weight prefix' pairs such as '0.3 dataA 0.7 dataB'")
    weights = [float(w) for w in words[0::2]]
    for w, prefix in zip(weights, words[1::2]):
        if not math.isfinite(w) or w < 0:
            raise MegaliteError(f"--data-path: weight {w} of {prefix!r} must be finite and >= 0")
    if sum(weights) <= 0:
        raise MegaliteError("--data-path: at least one weight must be positive")
    return words[1::2], weights


def normalise_weights(weights: Sequence[float]) -> np.ndarray:
    """float64 weights divided by their sum (which must be positive)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise MegaliteError(f"blending weights must be finite, >= 0 and not all 0; got {list(weights)}")
    return w / w.sum()


def blending_counts(weights: Sequence[float], size: int) -> np.ndarray:
    """How many samples the blending index of ``size`` steps draws from each dataset."""
    dataset_index, _ = _C.build_blending_index(normalise_weights(weights), size)
    return np.bincount(dataset_index, minlength=len(weights))


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Item i is ``datasets[dataset_index[i]][dataset_sample_index[i]]``; the arrays are int16
    ``[size]`` and int64 ``[size]``. Each component must hold at least as many samples as the
    index draws from it (:func:`blending_counts`)."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: int):
        if len(datasets) != len(weights):
            raise MegaliteError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets, self.weights, self.size = list(datasets), normalise_weights(weights), int(size)
        self.dataset_index, self.dataset_sample_index = _C.build_blending_index(self.weights,
                                                                                self.size)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for k, (dataset, count) in enumerate(zip(self.datasets, counts)):
            if count > len(dataset):
                raise MegaliteError(f"blended dataset component {k} has {len(dataset)} samples "
                                    f"but the blend draws {count} from it")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} samples")
        k = int(self.dataset_index[i])
        return self.datasets[k][int(self.dataset_sample_index[i])]


def _open_indexed(prefix: str):
    from megalite.data.indexed import IndexedDataset

    missing = [prefix + ext for ext in (".idx", ".bin") if not os.path.isfile(prefix + ext)]
    if missing:
        raise MegaliteError(f"--data-path: dataset prefix {prefix!r} not found (missing "
                            f"{', '.join(missing)})")
    return IndexedDataset(prefix)


def build_train_valid_test_datasets(
        data_path: list[str], split: str, num_samples: tuple[int, int, int], seq_length: int,
        seed: int, cache_dir: str | None = None, vocab_size: int | None = None
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None,
           torch.utils.data.Dataset | None]:
    """Train, valid and test datasets over ``data_path`` (see :func:`parse_data_path`).

    Each prefix's documents are split by ``split``; split k has ``num_samples[k]`` samples of
    ``seq_length + 1`` tokens, blended across prefixes by weight (token counts when no weights
    are given). A split with zero weight or zero samples is None. With one prefix the GPT
    dataset is returned directly. Every rank of a job must call this the same way (the index
    caches are built by one process; see ``index_cache``). With ``vocab_size``, a file holding
    a token id outside ``[0, vocab_size)`` is refused first (``token_range``)."""
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise MegaliteError(f"num_samples must be three non-negative counts, got {num_samples}")
    fractions = parse_split(split)
    prefixes, weights = parse_data_path(data_path)
    if weights is not None:  # zero-weight prefixes take no part
        kept = [(p, w) for p, w in zip(prefixes, weights) if w > 0]
        prefixes, weights = [p for p, _ in kept], [w for _, w in kept]
    indexed = [_open_indexed(p) for p in prefixes]
    if vocab_size is not None:
        check_token_ids(prefixes, vocab_size, cache_dir)
    if weights is None:
        weights = [float(np.asarray(d.sequence_lengths).sum(dtype=np.int64)) for d in indexed]
        if sum(weights) <= 0:
            raise MegaliteError(f"--data-path: the datasets {prefixes} contain no tokens")
    config = GPTDatasetConfig(seq_length=seq_length, seed=seed, split=split, cache_dir=cache_dir)
    ranges = [split_document_ranges(len(d.document_indices) - 1, fractions) for d in indexed]

    results = []
    for k, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[k])
        if fractions[k] == 0 or n == 0:
            results.append(None)
            continue
        if len(indexed) == 1:
            results.append(GPTDataset(indexed[0], ranges[0][k], n, config, name))
            continue
        # Size each component from the exact counts the blend will draw (same weights, same
        # index), plus the margin, so no component index runs past its end.
        counts = blending_counts(weights, n)
        total = sum(weights)
        parts = [GPTDataset(d, r[k], max(int(c), math.ceil(w / total * n * SIZE_MARGIN)), config,
                            name) for d, r, w, c in zip(indexed, ranges, weights, counts)]
        results.append(BlendedDataset(parts, weights, n))
    return tuple(results)
