"""GPT pretraining dataset: fixed-length samples cut from a shuffled stream of documents.

Megatron-LM's GPT dataset semantics (megatron-core's ``datasets/gpt_dataset.py``):

* ``split`` ("969,30,1") divides the *documents* of a token file into train/valid/test by
  cumulative fraction: split k covers documents ``[round(lo * N), round(hi * N))`` (halves round
  up; the last bound is exactly N).
* The dataset indexes the *sequences* of those documents (one sequence per document unless the
  data was sentence-split), as Megatron does.
* Three index arrays, built by ``megalite._C`` and cached on disk (``index_cache``):

  - document index, int32 ``[E * S]``: the split's sequence ids tiled E times and shuffled, E
    the smallest epoch count with ``E * tokens >= num_samples * seq_length + 1``. When the last
    epoch supplies under 80% of an epoch's samples (``5 * last < 4 * per_epoch``) it is
    shuffled separately, so the first E-1 epochs are whole permutations.
  - sample index, int64 ``[num_samples + 1, 2]``: (row of the document index, token offset);
    sample i is the ``seq_length + 1`` tokens from row i to row i+1 inclusive (consecutive
    samples share one token: the last input is the next sample's first).
  - shuffle index, int64 ``[num_samples]``: permutation of the sample ids (the samples of a
    separate final epoch are shuffled among themselves).

  The document index uses the PRNG seed ``seed``; the shuffle index uses ``seed + 1``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megalite import _C
from megalite.data.index_cache import default_cache_dir, file_identity, load_or_build
from megalite.errors import MegaliteError

SPLIT_NAMES = ("train", "valid", "test")
# Largest document index built (int32 rows: 8 GiB); beyond it the request is almost surely a
# mistake (a tiny split asked for a huge number of samples) rather than a real training run.
MAX_DOCUMENT_INDEX_ROWS = 2**31


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


def split_document_ranges(num_documents: int, split: str | Sequence[float]) -> list[tuple[int, int]]:
    """Document ranges ``[lo, hi)`` of train/valid/test: bounds ``round(c * N)`` of the
    cumulative fractions c (half rounds up), the last bound exactly ``num_documents``."""
    fractions = parse_split(split) if isinstance(split, str) else list(split)
    bounds, cumulative = [0], 0.0
    for f in fractions[:-1]:
        cumulative += f
        bounds.append(min(num_documents, int(math.floor(cumulative * num_documents + 0.5))))
    bounds.append(num_documents)
    return [(bounds[k], max(bounds[k], bounds[k + 1])) for k in range(len(fractions))]


def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E with ``E * tokens_per_epoch >= num_samples * seq_length + 1``."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def final_epoch_split(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int | None:
    """Number of samples served by the first E-1 epochs when the final epoch is to be shuffled
    separately (it supplies under 80% of an epoch's samples), else None."""
    epochs = num_epochs(tokens_per_epoch, seq_length, num_samples)
    if epochs == 1:
        return None
    before_last = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
    per_epoch = (tokens_per_epoch - 1) // seq_length
    return before_last if 5 * (num_samples - before_last) < 4 * per_epoch else None


@dataclass
class GPTDatasetConfig:
    """How samples are cut from a token file."""

    seq_length: int
    """Tokens per training sample; each item has ``seq_length + 1`` tokens (inputs + shifted labels)."""
    seed: int = 1234
    """Seed of the document shuffle (``seed``) and of the sample shuffle (``seed + 1``)."""
    split: str = "969,30,1"
    """train,valid,test weights over the documents (see :func:`parse_split`)."""
    cache_dir: str | None = None
    """Where the index arrays are cached; None: ``<directory of the data prefix>/index-cache``."""


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
    """``num_samples`` samples of ``seq_length + 1`` tokens from documents ``document_range``.

    Item i is an int64 numpy array ``[seq_length + 1]``. Every rank holding this dataset sees
    the same samples; the index arrays are memory maps shared through the page cache.
    ``index_built`` tells whether this process built the cached indices (False: loaded).
    """

    def __init__(self, indexed, document_range: tuple[int, int], num_samples: int,
                 config: GPTDatasetConfig, name: str = "train"):
        self.indexed, self.config, self.name = indexed, config, name
        self.num_samples = int(num_samples)
        prefix = _prefix_of(indexed)
        lo, hi = (int(x) for x in document_range)
        num_docs = len(indexed.document_indices) - 1
        if not 0 <= lo <= hi <= num_docs:
            raise MegaliteError(f"{prefix}: document range [{lo}, {hi}) of the {name} split is "
                                f"outside the {num_docs} documents")
        if config.seq_length < 1:
            raise MegaliteError(f"seq_length must be >= 1, got {config.seq_length}")
        if self.num_samples < 1:
            raise MegaliteError(f"{prefix}: the {name} split needs num_samples >= 1, got {num_samples}")
        seq_lo, seq_hi = int(indexed.document_indices[lo]), int(indexed.document_indices[hi])
        if seq_hi > 2**31:
            raise MegaliteError(f"{prefix}: more than 2^31 sequences are not supported")
        sizes = np.asarray(indexed.sequence_lengths)
        tokens = _count_tokens(indexed, seq_lo, seq_hi)
        if tokens == 0:
            raise MegaliteError(
                f"{prefix}: the {name} split (documents [{lo}, {hi}) of {num_docs}) contains no "
                f"tokens, so it cannot supply {num_samples} samples; give it a larger share in "
                "--split or use more data")
        self.document_range, self.tokens_per_epoch = (lo, hi), tokens
        self.num_epochs = num_epochs(tokens, config.seq_length, self.num_samples)
        if self.num_epochs * (seq_hi - seq_lo) > MAX_DOCUMENT_INDEX_ROWS:
            raise MegaliteError(
                f"{prefix}: {num_samples} samples of {config.seq_length} tokens need "
                f"{self.num_epochs} passes over the {tokens} tokens of the {name} split, a "
                f"document index of {self.num_epochs * (seq_hi - seq_lo)} rows (limit "
                f"{MAX_DOCUMENT_INDEX_ROWS}); use more data or fewer samples")
        first = final_epoch_split(tokens, config.seq_length, self.num_samples)
        self.separate_final_epoch = first is not None

        description = {"kind": "gpt", "idx": file_identity(prefix + ".idx"), "split": name,
                       "document_range": [lo, hi], "sequence_range": [seq_lo, seq_hi],
                       "num_samples": self.num_samples, "seq_length": config.seq_length,
                       "seed": config.seed}

        def build() -> dict[str, np.ndarray]:
            doc = _C.build_document_index(seq_lo, seq_hi, self.num_epochs,
                                          self.separate_final_epoch, config.seed % 2**64)
            sample = _C.build_sample_index(sizes, doc, config.seq_length, self.num_samples)
            shuffle = _C.build_shuffle_index(
                self.num_samples, self.num_samples if first is None else first,
                (config.seed + 1) % 2**64)
            return {"document_index": doc, "sample_index": sample, "shuffle_index": shuffle}

        cache_dir = default_cache_dir(prefix, config.cache_dir)
        arrays, self.index_built = load_or_build(
            cache_dir, description, ["document_index", "sample_index", "shuffle_index"], build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        if (self.sample_index.shape != (self.num_samples + 1, 2)
                or self.shuffle_index.shape != (self.num_samples,)):
            raise MegaliteError(f"index cache in {cache_dir} has arrays of the wrong shape for "
                                f"{prefix} ({name}); delete it to rebuild")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        j = int(self.shuffle_index[i])
        (row0, off0), (row1, off1) = (tuple(int(x) for x in r) for r in self.sample_index[j:j + 2])
        docs, get = self.document_index, self.indexed.get
        if row0 == row1:
            tokens = get(int(docs[row0]), offset=off0, length=off1 - off0 + 1)
        else:
            parts = [get(int(docs[row0]), offset=off0)]
            parts += [get(int(docs[r])) for r in range(row0 + 1, row1)]
            parts.append(get(int(docs[row1]), offset=0, length=off1 + 1))
            tokens = np.concatenate(parts)
        return np.asarray(tokens, dtype=np.int64)
