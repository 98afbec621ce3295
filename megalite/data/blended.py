"""Blending several GPT datasets by weight, and the train/valid/test builder the trainer calls.

Two blending rules (``blend_rule``); both take dataset k's samples in order 0, 1, 2, ..., are
deterministic (no seed) and cheap (O(size * datasets) in C++), so the index is computed, not
cached:

* ``"megalite"`` (default): Tijdeman's solution of the chairman assignment problem
  (``megalite._C.build_blending_index``, stated in full in ``csrc/index_helpers.cpp``). Weights
  normalised to sum to 1; after every step t each dataset's count is within ``1 - 1/(2K-2)``
  (< 1) of its ideal share ``w[k] * t`` (K positive weights). The blend has exactly
  ``num_samples`` samples; component k is asked for ``max(drawn, ceil(w[k] * n * 1.005))``.
* ``"megatron"``: megatron-core's rule (0.16.1), reproduced exactly: its dataset index, dataset
  sample index, component sizes and blend size. Row r draws the largest
  ``w[k] * max(r, 1) - drawn[k]``, which can fall more than one sample behind a share with
  three or more datasets. Weighted: component k is asked for ``ceil(ceil(n * w[k]) * 1.005)``
  samples and the blend has ``sum_k ceil(n * w[k])``; unweighted: each component holds one
  epoch and is weighted by its sample count, the blend has ``n`` samples (an error if the
  epochs hold fewer). A single prefix given with a weight is blended (one component), as in
  Megatron.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from megalite.data.gpt_dataset import (DEFAULT_PAD_TOKEN_ID, SPLIT_NAMES, GPTDataset,
                                       GPTDatasetConfig, parse_split, split_sequence_ranges)
from megalite.data.token_range import check_token_ids
from megalite.errors import MegaliteError

BLEND_RULES = ("megalite", "megatron")
# Each component is sized this much above its share (megatron-core's default
# mid_level_dataset_surplus, 0.005, which both rules use).
SIZE_MARGIN = 1 + 0.005


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
    words = [w for item in data_path or () for w in str(item).split()]
    if not words:
        raise MegaliteError("--data-path: no dataset prefix given (give --data-path PREFIX or "
                            "--mock-data)")
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
    """float64 weights divided by their (numpy) sum, which must be positive; bit for bit what
    megatron-core's ``normalize`` returns."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise MegaliteError(f"blending weights must be finite, >= 0 and not all 0; got {list(weights)}")
    return w / np.sum(w)


def check_blend_rule(blend_rule: str) -> str:
    if blend_rule not in BLEND_RULES:
        raise MegaliteError(f"--blend-rule {blend_rule!r}: expected one of {', '.join(BLEND_RULES)}")
    return blend_rule


def blending_index(weights: Sequence[float], size: int, blend_rule: str = "megalite"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(int16 ``[size]`` dataset ids, int64 ``[size]`` sample within that dataset) of the blend
    of ``size`` steps under ``blend_rule``, the weights normalised first."""
    from megalite import _C   # where used: mock-data runs need no C++ extension

    build = (_C.build_blending_index_megatron if check_blend_rule(blend_rule) == "megatron"
             else _C.build_blending_index)
    return build(normalise_weights(weights), int(size))


def blending_counts(weights: Sequence[float], size: int, blend_rule: str = "megalite") -> np.ndarray:
    """How many samples the blending index of ``size`` steps draws from each dataset."""
    dataset_index, _ = blending_index(weights, size, blend_rule)
    return np.bincount(dataset_index, minlength=len(weights))


def megatron_component_sizes(weights: Sequence[float], num_samples: int) -> tuple[list[int], int]:
    """Megatron's sizes for a weighted blend of ``num_samples``: the samples requested from each
    component, ``ceil(ceil(n * w[k]) * 1.005)``, and the blend's size, ``sum ceil(n * w[k])``
    (w normalised; Python float arithmetic in Megatron's order)."""
    w = normalise_weights(weights).tolist()
    shares = [int(math.ceil(num_samples * wk)) for wk in w]
    return [int(math.ceil(math.ceil(num_samples * wk) * SIZE_MARGIN)) for wk in w], sum(shares)


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` by ``blend_rule``.

    Item i is ``datasets[dataset_index[i]][dataset_sample_index[i]]`` (a dict item gains
    ``dataset_id``, int64 ``[]``: that dataset's number); the arrays are int16 ``[size]`` and
    int64 ``[size]``. Each component must hold at least as many samples as the
    index draws from it (:func:`blending_counts`)."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: int, blend_rule: str = "megalite"):
        if len(datasets) != len(weights):
            raise MegaliteError(f"{len(datasets)} datasets but {len(weights)} weights")
        if check_blend_rule(blend_rule) == "megatron" and not all(w > 0 for w in weights):
            raise MegaliteError(f"the Megatron blend needs positive weights, got {list(weights)}")
        self.datasets, self.size, self.blend_rule = list(datasets), int(size), blend_rule
        self.weights = normalise_weights(weights)
        self.dataset_index, self.dataset_sample_index = blending_index(self.weights, self.size,
                                                                       blend_rule)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for k, (dataset, count) in enumerate(zip(self.datasets, counts)):
            if count > len(dataset):
                raise MegaliteError(f"blended dataset component {k} has {len(dataset)} samples "
                                    f"but the blend draws {count} from it")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} samples")
        k = int(self.dataset_index[i])
        item = self.datasets[k][int(self.dataset_sample_index[i])]
        if isinstance(item, dict):  # BERT/T5 items say where they come from, as Megatron's
            return {"dataset_id": np.array(k, dtype=np.int64), **item}
        return item


def _open_indexed(prefix: str):
    from megalite.data.indexed import IndexedDataset

    missing = [prefix + ext for ext in (".idx", ".bin") if not os.path.isfile(prefix + ext)]
    if missing:
        raise MegaliteError(f"--data-path: dataset prefix {prefix!r} not found (missing "
                            f"{', '.join(missing)})")
    return IndexedDataset(prefix)


def _blend_split(indexed, ranges, weights, given_weights, n, name, blend_rule, make):
    """The ``name`` split of several prefixes (or of one weighted prefix under Megatron's rule);
    ``make(indexed, range, num_samples, name)`` builds one component."""
    if blend_rule == "megatron":
        if given_weights is None:  # one epoch of each, weighted by its sample count
            parts = [make(d, r, None, name) for d, r in zip(indexed, ranges)]
            lengths = [len(p) for p in parts]
            if sum(lengths) < n:
                raise MegaliteError(
                    f"the unweighted Megatron blend of the {name} split holds {sum(lengths)} "
                    f"samples (one epoch of each dataset) but {n} are needed; give weights in "
                    "--data-path or use --blend-rule megalite")
            return BlendedDataset(parts, lengths, n, blend_rule)
        # Megatron normalises the weights for the sizes and again inside its blended dataset.
        sizes, size = megatron_component_sizes(given_weights, n)
        parts = [make(d, r, s, name) for d, r, s in zip(indexed, ranges, sizes)]
        return BlendedDataset(parts, normalise_weights(given_weights), size, blend_rule)
    # Size each component from the exact counts the blend will draw (same weights, same
    # index), plus the margin, so no component index runs past its end.
    counts = blending_counts(weights, n)
    total = sum(weights)
    parts = [make(d, r, max(int(c), math.ceil(w / total * n * SIZE_MARGIN)), name)
             for d, r, w, c in zip(indexed, ranges, weights, counts)]
    return BlendedDataset(parts, weights, n)


def build_split_datasets(data_path: list[str], split: str, num_samples: Sequence[int], make,
                         units: str = "sequences", cache_dir: str | None = None,
                         vocab_size: int | None = None, blend_rule: str = "megalite"):
    """Train, valid and test datasets of any kind over ``data_path``: the split, blending and
    token check of :func:`build_train_valid_test_datasets`, each component built by
    ``make(indexed, (lo, hi), num_samples or None, split_name)`` over the ``units``
    ("sequences" or "documents") ``[lo, hi)`` of its file."""
    check_blend_rule(blend_rule)
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise MegaliteError(f"num_samples must be three non-negative counts, got {num_samples}")
    fractions = parse_split(split)
    prefixes, given_weights = parse_data_path(data_path)
    if given_weights is not None:  # zero-weight prefixes take no part
        kept = [(p, w) for p, w in zip(prefixes, given_weights) if w > 0]
        prefixes, given_weights = [p for p, _ in kept], [w for _, w in kept]
    indexed = [_open_indexed(p) for p in prefixes]
    if vocab_size is not None:
        check_token_ids(prefixes, vocab_size, cache_dir)
    weights = given_weights
    if weights is None and blend_rule == "megalite":
        weights = [float(np.asarray(d.sequence_lengths).sum(dtype=np.int64)) for d in indexed]
        if sum(weights) <= 0:
            raise MegaliteError(f"--data-path: the datasets {prefixes} contain no tokens")
    count = {"sequences": lambda d: len(d.sequence_lengths),
             "documents": lambda d: len(d.document_indices) - 1}[units]
    ranges = [split_sequence_ranges(count(d), fractions) for d in indexed]
    direct = len(indexed) == 1 and (blend_rule == "megalite" or given_weights is None)

    results = []
    for k, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[k])
        if fractions[k] == 0 or n == 0:
            results.append(None)
        elif direct:
            results.append(make(indexed[0], ranges[0][k], n, name))
        else:
            results.append(_blend_split(indexed, [r[k] for r in ranges], weights, given_weights,
                                        n, name, blend_rule, make))
    return tuple(results)


def build_train_valid_test_datasets(
        data_path: list[str], split: str, num_samples: tuple[int, int, int], seq_length: int,
        seed: int, cache_dir: str | None = None, vocab_size: int | None = None,
        blend_rule: str = "megalite", add_extra_token_to_sequence: bool = True,
        drop_last_partial_validation_sequence: bool = True,
        pad_token_id: int = DEFAULT_PAD_TOKEN_ID,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None,
           torch.utils.data.Dataset | None]:
    """Train, valid and test datasets over ``data_path`` (see :func:`parse_data_path`).

    Each prefix's sequences are split by ``split``; split k serves ``num_samples[k]`` samples
    of ``seq_length + 1`` tokens (``seq_length`` without the extra token), blended across
    prefixes by ``blend_rule`` (module docstring; prefixes without weights are weighted by
    token count under ``"megalite"``). A split with zero weight or zero samples is None; a
    prefix with weight 0 takes no part. With one prefix (and no weight under ``"megatron"``)
    the GPT dataset is returned directly. Every rank of a job must call this the same way (the
    index caches are built by one process; see ``index_cache``). With ``vocab_size``, a file
    holding a token id outside ``[0, vocab_size)`` is refused first (``token_range``)."""
    config = GPTDatasetConfig(seq_length=seq_length, seed=seed, split=split, cache_dir=cache_dir,
                              add_extra_token_to_sequence=add_extra_token_to_sequence,
                              drop_last_partial_validation_sequence=drop_last_partial_validation_sequence,
                              pad_token_id=pad_token_id)
    return build_split_datasets(
        data_path, split, num_samples,
        lambda indexed, seqs, n, name: GPTDataset(indexed, seqs, n, config, name),
        units="sequences", cache_dir=cache_dir, vocab_size=vocab_size, blend_rule=blend_rule)
