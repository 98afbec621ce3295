"""The range of token ids in a token file, checked against the model's vocabulary before training.

Data tokenized with one tokenizer and trained with another (a 32,000-entry model's ids fed to a
2,000-entry embedding) must not train: under tensor parallelism an id past every rank's slice
would embed to zeros and score a logit of 0, so the run "works" with a meaningless loss.

The smallest and largest id of each ``PREFIX.bin`` are found by one pass over the file and
cached like the dataset indices (``index_cache``: ``<data dir>/index-cache`` or
``--data-cache-path``, keyed by the file's path, size and mtime), so the pass runs once per file,
on one rank; every rank reads the same cached numbers and raises the same error.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from megalite.data.index_cache import default_cache_dir, file_identity, load_or_build
from megalite.errors import MegaliteError

__all__ = ["token_id_range", "check_token_ids"]

# Tokens per step of the scan: bounds the temporary memory of min/max (a few hundred MB at most).
_SCAN_CHUNK = 1 << 26


def _scan(bin_path: str, dtype: np.dtype) -> dict[str, np.ndarray]:
    lo, hi, count = np.iinfo(np.int64).max, -1, 0
    if os.path.getsize(bin_path):
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        count = len(tokens)
        for start in range(0, count, _SCAN_CHUNK):
            chunk = tokens[start:start + _SCAN_CHUNK]
            lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
        del tokens
    if count == 0:
        lo = 0
    return {"token_id_range": np.array([lo, hi, count], dtype=np.int64)}


def token_id_range(prefix: str, cache_dir: str | None = None) -> tuple[int, int]:
    """(smallest, largest) token id in ``PREFIX.bin`` ((0, -1) for a file without tokens).

    Cached; collective when ``torch.distributed`` is initialised (every rank must call it, see
    ``index_cache.load_or_build``)."""
    from megalite.data.indexed import IndexedDataset, data_file_path, index_file_path

    dtype = IndexedDataset(prefix).dtype  # validates both files, errors name them
    bin_path = data_file_path(prefix)
    description = {"kind": "token-id-range", "bin": file_identity(bin_path),
                   "idx": file_identity(index_file_path(prefix)), "dtype": np.dtype(dtype).name}
    arrays, _ = load_or_build(default_cache_dir(prefix, cache_dir), description,
                              ["token_id_range"], lambda: _scan(bin_path, np.dtype(dtype)))
    lo, hi, _count = (int(x) for x in arrays["token_id_range"])
    return lo, hi


def check_token_ids(prefixes: Sequence[str], vocab_size: int,
                    cache_dir: str | None = None) -> None:
    """MegaliteError naming the file when any token id of ``prefixes`` is outside
    ``[0, vocab_size)`` (the model's unpadded vocabulary)."""
    for prefix in prefixes:
        lo, hi = token_id_range(prefix, cache_dir)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise MegaliteError(
                f"{prefix}.bin: token id {bad} is outside the model's vocabulary of "
                f"{vocab_size} ids (the file holds ids {lo}..{hi}); it was tokenized with "
                "another tokenizer: preprocess it with this run's tokenizer, or train with the "
                "tokenizer it was made with (--tokenizer-type/--tokenizer-model/--vocab-file, "
                "or --vocab-size)")
