"""GPT pretraining dataset: fixed-length samples cut from a shuffled stream of sequences.

The indices are megatron-core's ``GPTDataset`` indices (0.16.1), value for value, for the same
seed, split, sequence length, sample count, ``add_extra_token_to_sequence`` and
``drop_last_partial_validation_sequence`` (the tests compare them with the installed
megatron-core), and so are every sample's tokens. With ``x = add_extra_token_to_sequence`` (1 or
0):

* ``split`` ("969,30,1") divides the N *sequences* of a token file (one per document unless the
  data was sentence-split) into train/valid/test: split k covers ``[round(c[k] * N),
  round(c[k+1] * N))`` at the cumulative fractions ``c`` (Python's ``round``, halves to even:
  484.5 -> 484).
* Epochs: the smallest E with ``E * tokens >= num_samples * seq_length + x`` (E = 1 when
  ``num_samples`` is None). The dataset holds every sample its E epochs provide, ``S = (E *
  tokens - x) // seq_length`` (the valid split, when it keeps its partial last sample,
  ``ceil(float32(E * tokens - x) / seq_length)``, computed in single precision as Megatron
  does), so ``len(dataset) = S >= num_samples``.
* Three index arrays, built by ``megalite._C`` and cached on disk (``index_cache``); both
  shuffles draw from one ``numpy.random.RandomState(seed)`` (reproduced in C++), the document
  index first:

  - document index, int32 ``[E * n]``: the split's n sequence ids tiled E times and shuffled. When
    E > 1 and the last epoch supplies fewer than ``int(0.8 * per_epoch)`` of the requested
    samples (``per_epoch = (tokens - x) // seq_length``), the first E-1 copies are shuffled
    together and the last copy then on its own.
  - sample index, int64 ``[S + 1, 2]``: (row of the document index, offset). Sample i is the
    ``seq_length + x`` tokens of the document stream from position ``i * seq_length`` (so with
    x = 1 consecutive samples share one token); a partial last valid sample is padded with
    ``pad_token_id``. The exact row layout is stated in ``csrc/index_helpers.cpp``.
  - shuffle index, int64 ``[S]``: a permutation of the sample ids, shuffled as one block or, with
    a separate final epoch, ``[0, before)`` and ``[before, S)`` separately (``before`` = the
    samples of the first E-1 epochs).

Dataset item i is sample ``shuffle_index[i]``. Seeds must lie in ``[0, 2^32 - 1]``, as
``RandomState`` requires.

:class:`MockGPTDataset` (``--mock-data``) has items of the same shape drawn at random, no files.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megalite.data.index_cache import default_cache_dir, file_identity, load_or_build
from megalite.errors import MegaliteError

SPLIT_NAMES = ("train", "valid", "test")
# Largest document index built (int32 rows: 8 GiB); beyond it the request is almost surely a
# mistake (a tiny split asked for a huge number of samples) rather than a real training run.
MAX_DOCUMENT_INDEX_ROWS = 2**31
# Megatron's threshold: a final epoch supplying under this share of an epoch is shuffled apart.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
# What a partial last sample is padded with (megatron-core's value when the tokenizer has no pad).
DEFAULT_PAD_TOKEN_ID = -1


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``"98/2/0"``, ``"1"``) -> three fractions summing to 1.

    Up to three non-negative numbers separated by ``,`` or ``/``; missing ones are 0."""
    text = str(split).strip()
    parts = [p.strip() for p in text.replace("/", ",").split(",")]
    if not text or len(parts) > 3 or any(not p for p in parts):
        raise MegaliteError(f"--split {split!r}: expected up to three comma-separated weights "
                            "for train,valid,test, e.g. '969,30,1'")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise MegaliteError(f"--split {split!r}: weights must be numbers, e.g. '969,30,1'") from None
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise MegaliteError(f"--split {split!r}: weights must be finite and >= 0")
    total = sum(weights)
    if total <= 0:
        raise MegaliteError(f"--split {split!r}: at least one weight must be positive")
    weights += [0.0] * (3 - len(weights))
    return [w / total for w in weights]


def split_sequence_ranges(num_sequences: int, split: str | Sequence[float]
                          ) -> list[tuple[int, int]]:
    """Sequence ranges ``[lo, hi)`` of train/valid/test: bounds ``round(c * N)`` (Python's round,
    halves to even) of the cumulative fractions c, summed in order as Megatron sums them."""
    fractions = parse_split(split) if isinstance(split, str) else list(split)
    bounds, cumulative = [0], 0.0
    for f in fractions:
        cumulative += f
        bounds.append(min(num_sequences, max(0, int(round(cumulative * float(num_sequences))))))
    return [(bounds[k], max(bounds[k], bounds[k + 1])) for k in range(len(fractions))]


def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int | None,
               add_extra_token: bool = True) -> int:
    """Smallest E with ``E * tokens_per_epoch >= num_samples * seq_length + x``; 1 for None."""
    if num_samples is None:
        return 1
    return max(1, -(-(num_samples * seq_length + int(add_extra_token)) // tokens_per_epoch))


def samples_available(epochs: int, tokens_per_epoch: int, seq_length: int,
                      add_extra_token: bool = True, drop_last_partial: bool = True) -> int:
    """Samples S that ``epochs`` epochs provide (the length of the shuffle index)."""
    stream = epochs * tokens_per_epoch - int(add_extra_token)
    if drop_last_partial:
        return stream // seq_length
    # Megatron counts a kept partial sample in C++ single precision; so must we, to agree.
    return int(math.ceil(np.float32(stream) / np.float32(seq_length)))


def final_epoch_split(tokens_per_epoch: int, seq_length: int, num_samples: int | None,
                      add_extra_token: bool = True) -> int | None:
    """Samples of the first E-1 epochs when the final epoch is shuffled separately (E > 1 and it
    supplies fewer than ``int(0.8 * per_epoch)`` of the ``num_samples``), else None."""
    epochs = num_epochs(tokens_per_epoch, seq_length, num_samples, add_extra_token)
    if epochs == 1:
        return None
    extra = int(add_extra_token)
    before_last = ((epochs - 1) * tokens_per_epoch - extra) // seq_length
    per_epoch = (tokens_per_epoch - extra) // seq_length
    separate = num_samples - before_last < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    return before_last if separate else None


def check_seed(seed: int) -> int:
    """The seed as an int in ``[0, 2^32 - 1]`` (what ``numpy.random.RandomState`` accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise MegaliteError(f"--seed {seed!r}: the dataset shuffles need a seed in [0, 2^32 - 1] "
                            "(numpy.random.RandomState, as in Megatron)")
    return int(seed)


@dataclass
class GPTDatasetConfig:
    """How samples are cut from a token file (the field names of megatron-core's config)."""

    seq_length: int
    """Tokens per sample before the extra one; each item has ``seq_length + x`` tokens."""
    seed: int = 1234
    """Seed of the one ``RandomState`` both shuffles draw from, in ``[0, 2^32 - 1]``."""
    split: str = "969,30,1"
    """train,valid,test weights over the sequences (see :func:`parse_split`)."""
    cache_dir: str | None = None
    """Where the index arrays are cached; None: ``<directory of the data prefix>/index-cache``."""
    add_extra_token_to_sequence: bool = True
    """x = 1: samples of ``seq_length + 1`` tokens (inputs and labels shifted by one); x = 0:
    ``seq_length`` tokens, consecutive samples not overlapping."""
    drop_last_partial_validation_sequence: bool = True
    """False: the valid split keeps its partial last sample, padded with ``pad_token_id``."""
    pad_token_id: int = DEFAULT_PAD_TOKEN_ID
    """What pads a partial last sample (only with ``drop_last_partial_validation_sequence``
    False)."""


def _prefix_of(indexed) -> str:
    for attr in ("prefix", "path_prefix"):
        value = getattr(indexed, attr, None)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    raise MegaliteError(f"{type(indexed).__name__} does not say which file it reads "
                        "(no .prefix), so its index cannot be cached")


def _count_tokens(indexed, seq_lo: int, seq_hi: int) -> int:
    """Tokens in sequences [seq_lo, seq_hi). O(1) from the byte pointers when the reader has them
    (they are validated running sums), so reopening a cached dataset does not scan the lengths."""
    if seq_hi <= seq_lo:
        return 0
    pointers, itemsize = getattr(indexed, "sequence_pointers", None), getattr(indexed, "dtype", None)
    if pointers is not None and itemsize is not None:
        span = int(pointers[seq_hi - 1]) - int(pointers[seq_lo])
        return span // np.dtype(itemsize).itemsize + int(indexed.sequence_lengths[seq_hi - 1])
    return int(np.asarray(indexed.sequence_lengths[seq_lo:seq_hi]).sum(dtype=np.int64))


class GPTDataset(torch.utils.data.Dataset):
    """The samples of sequences ``sequence_range`` of ``indexed`` (see the module docstring).

    ``num_samples``: how many samples the caller will read (None: one epoch); the dataset holds
    every sample of the epochs that takes, ``len(self) >= num_samples``, as Megatron's does.
    Item i is an int64 numpy array ``[seq_length + x]``. Every rank holding this dataset sees
    the same samples; the index arrays are memory maps shared through the page cache.
    ``index_built`` tells whether this process built the cached indices (False: loaded).
    """

    def __init__(self, indexed, sequence_range: tuple[int, int], num_samples: int | None,
                 config: GPTDatasetConfig, name: str = "train"):
        self.indexed, self.config, self.name = indexed, config, name
        self.num_samples = None if num_samples is None else int(num_samples)
        prefix = _prefix_of(indexed)
        lo, hi = (int(x) for x in sequence_range)
        num_seqs = len(indexed.sequence_lengths)
        if not 0 <= lo <= hi <= num_seqs:
            raise MegaliteError(f"{prefix}: sequence range [{lo}, {hi}) of the {name} split is "
                                f"outside the {num_seqs} sequences")
        if config.seq_length < 1:
            raise MegaliteError(f"seq_length must be >= 1, got {config.seq_length}")
        if self.num_samples is not None and self.num_samples < 1:
            raise MegaliteError(f"{prefix}: the {name} split needs num_samples >= 1, got {num_samples}")
        if hi > 2**31:
            raise MegaliteError(f"{prefix}: more than 2^31 sequences are not supported")
        seed = check_seed(config.seed)
        extra = bool(config.add_extra_token_to_sequence)
        self.extra_token = int(extra)
        # Megatron keeps a partial last sample only in the valid split, and only when asked.
        drop_last = name != "valid" or bool(config.drop_last_partial_validation_sequence)
        sizes = np.asarray(indexed.sequence_lengths)
        tokens = _count_tokens(indexed, lo, hi)
        if tokens == 0:
            raise MegaliteError(
                f"{prefix}: the {name} split (sequences [{lo}, {hi}) of {num_seqs}) contains no "
                f"tokens, so it cannot supply {num_samples} samples; give it a larger share in "
                "--split or use more data")
        self.sequence_range, self.tokens_per_epoch = (lo, hi), tokens
        self.num_epochs = num_epochs(tokens, config.seq_length, self.num_samples, extra)
        if self.num_epochs * (hi - lo) > MAX_DOCUMENT_INDEX_ROWS:
            raise MegaliteError(
                f"{prefix}: {num_samples} samples of {config.seq_length} tokens need "
                f"{self.num_epochs} passes over the {tokens} tokens of the {name} split, a "
                f"document index of {self.num_epochs * (hi - lo)} rows (limit "
                f"{MAX_DOCUMENT_INDEX_ROWS}); use more data or fewer samples")
        total = samples_available(self.num_epochs, tokens, config.seq_length, extra, drop_last)
        first = final_epoch_split(tokens, config.seq_length, self.num_samples, extra)
        self.separate_final_epoch = first is not None
        self.total_samples = total

        description = {"kind": "gpt", "idx": file_identity(prefix + ".idx"), "split": name,
                       "sequence_range": [lo, hi], "num_samples": self.num_samples,
                       "seq_length": config.seq_length, "seed": seed,
                       "add_extra_token": extra, "drop_last_partial": drop_last}

        def build() -> dict[str, np.ndarray]:
            from megalite import _C   # where used: mock-data runs need no C++ extension

            rng = _C.LegacyRandomState(seed)  # document index first, then the shuffle index
            doc = _C.build_document_index(lo, hi, self.num_epochs, self.separate_final_epoch, rng)
            sample = _C.build_sample_index(sizes, doc, config.seq_length, total, extra,
                                           not drop_last)
            shuffle = _C.build_shuffle_index(total, total if first is None else first, rng)
            return {"document_index": doc, "sample_index": sample, "shuffle_index": shuffle}

        cache_dir = default_cache_dir(prefix, config.cache_dir)
        arrays, self.index_built = load_or_build(
            cache_dir, description, ["document_index", "sample_index", "shuffle_index"], build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        if self.sample_index.shape != (total + 1, 2) or self.shuffle_index.shape != (total,):
            raise MegaliteError(f"index cache in {cache_dir} has arrays of the wrong shape for "
                                f"{prefix} ({name}); delete it to rebuild")

    def __len__(self) -> int:
        return self.total_samples

    def __getitem__(self, i) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.total_samples
        if not 0 <= i < self.total_samples:
            raise IndexError(f"sample {i} out of range for {self.total_samples} samples")
        j = int(self.shuffle_index[i])
        (row0, off0), (row1, off1) = (tuple(int(x) for x in r) for r in self.sample_index[j:j + 2])
        docs, get, extra = self.document_index, self.indexed.get, self.extra_token
        if row0 == row1:
            tokens = get(int(docs[row0]), offset=off0, length=off1 - off0 + extra)
        else:
            parts = [get(int(docs[row0]), offset=off0)]
            parts += [get(int(docs[r])) for r in range(row0 + 1, row1)]
            parts.append(get(int(docs[row1]), offset=0, length=off1 + extra))
            tokens = np.concatenate(parts)
        tokens = np.asarray(tokens, dtype=np.int64)
        missing = self.config.seq_length + extra - len(tokens)
        if missing > 0:  # the partial last valid sample
            tokens = np.concatenate([tokens, np.full(missing, self.config.pad_token_id, np.int64)])
        return tokens


class MockGPTDataset(torch.utils.data.Dataset):
    """``--mock-data``: sample i is ``seq_length + 1`` tokens drawn uniformly from
    ``[0, vocab_size)`` by a generator seeded with ``(seed, i)``; no files needed."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = (
            vocab_size, seq_length, num_samples, seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(i)])
        return rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)
