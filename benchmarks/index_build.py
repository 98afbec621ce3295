"""Benchmark: GPT dataset index building, megalite (C++) vs megatron-core's own path.

Both build the same three arrays (document, sample and shuffle index) for the same corpus, seed
and sequence length, and the script checks they are identical:

* megalite: ``megalite._C`` (``LegacyRandomState`` + the three builders), as ``GPTDataset`` calls it;
* megatron-core 0.16.1: what its ``GPTDataset`` runs, in its order: ``_build_document_index``
  (numpy ``RandomState.shuffle``), the copy of the sequence lengths it makes for its helper,
  ``helpers.build_sample_idx`` (its C++), ``_build_shuffle_index`` (numpy again).

The two are timed alternately in one process, ``--repeat`` times each; the figure is megalite's
best time / megatron-core's best time (and the same ratio for each round). Optionally the
pure-Python/numpy twins of tests/index_reference.py are timed too (``--reference``), and the cache
write / open and the ``GPTDataset`` first build / reopen are measured.

Synthetic corpora are just arrays of document lengths (the index builders never read tokens):
lengths uniform in [1, 2 * mean - 1], so ``documents * mean`` tokens on average. One epoch's
worth of samples is indexed (``(tokens - 1) // seq_length``), as in a one-epoch pretraining run.
Prints one JSON object, e.g.::

    python benchmarks/index_build.py                                    # 1B tokens
    python benchmarks/index_build.py --documents 200000000 --no-megatron --repeat 1   # 100B
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np

# The pure-Python twins are a test oracle and live in tests/, not in the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import index_reference as ref  # noqa: E402

from megalite import _C  # noqa: E402
from megalite.data.gpt_dataset import (final_epoch_split, num_epochs,  # noqa: E402
                                       samples_available)
from megalite.data.index_cache import load_or_build  # noqa: E402

NAMES = ["document_index", "sample_index", "shuffle_index"]


def plan(tokens: int, seq_length: int, num_samples: int) -> tuple[int, int | None, int]:
    """(epochs, samples before a separate final epoch or None, all samples) as GPTDataset has."""
    epochs = num_epochs(tokens, seq_length, num_samples)
    return (epochs, final_epoch_split(tokens, seq_length, num_samples),
            samples_available(epochs, tokens, seq_length))


def timed(steps) -> tuple[dict, dict]:
    """Run ``[(name, fn)]`` in order; returns (results, seconds per step and total)."""
    results, times = {}, {}
    t_start = time.perf_counter()
    for name, fn in steps:
        t0 = time.perf_counter()
        results[name] = fn(results)
        times[name] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    return results, times


def build_twin(impl, rng, sizes, tokens, seq_length, num_samples):
    """The arrays as GPTDataset builds them, with ``megalite._C`` and its LegacyRandomState, or
    with the twins of tests/index_reference.py and numpy's RandomState (same signatures)."""
    epochs, first, total = plan(tokens, seq_length, num_samples)
    return timed([
        ("document_index", lambda r: impl.build_document_index(0, len(sizes), epochs,
                                                               first is not None, rng)),
        ("sample_index", lambda r: impl.build_sample_index(sizes, r["document_index"],
                                                           seq_length, total, True, False)),
        ("shuffle_index", lambda r: impl.build_shuffle_index(total, total if first is None
                                                             else first, rng))])


def build_megatron(sizes, tokens, seq_length, num_samples, seed):
    with warnings.catch_warnings():  # it warns that Apex / Transformer Engine are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
        from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
    epochs, first, total = plan(tokens, seq_length, num_samples)
    rng = np.random.RandomState(seed)
    indices = np.arange(len(sizes), dtype=np.int32)

    def sample_index(r):
        # GPTDataset copies the lengths first when the document index is dense in them.
        lengths = sizes.copy() if len(r["document_index"]) * 2 > len(sizes) else sizes
        return helpers.build_sample_idx(lengths, r["document_index"], seq_length, epochs, tokens,
                                        True, True)

    return timed([
        ("document_index", lambda r: _build_document_index(indices, epochs, rng,
                                                           first is not None)),
        ("sample_index", sample_index),
        ("shuffle_index", lambda r: _build_shuffle_index(total if first is None else first,
                                                         total, rng))])


def same(a: dict, b: dict) -> bool:
    """Equal values (megatron-core stores narrower dtypes: int32 sample index, uint32 shuffle)."""
    return all(a[n].shape == b[n].shape and np.array_equal(a[n], b[n]) for n in NAMES)


def write_synthetic_dataset(prefix: str, sizes: np.ndarray) -> None:
    """A real MMIDIDX pair with these sequence lengths (uint16 tokens): the .idx written from the
    format spec, the .bin a sparse file of the right size (its tokens read as zeros)."""
    n = len(sizes)
    pointers = np.zeros(n, np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * 2, out=pointers[1:])
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + np.array([1], "<u8").tobytes() + bytes([8])
                + np.array([n, n + 1], "<u8").tobytes())
        f.write(sizes.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.arange(n + 1, dtype="<i8").tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(sizes.sum(dtype=np.int64)) * 2)


def measure_dataset_open(sizes: np.ndarray, seq_length: int, num_samples: int, seed: int,
                         directory: str) -> dict:
    """Seconds to open the token files, build a GPTDataset (first time) and open it again from
    the cache (what every later run and every other rank does)."""
    from megalite.data.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megalite.data.indexed import IndexedDataset

    prefix = os.path.join(directory, "synthetic")
    write_synthetic_dataset(prefix, sizes)
    config = GPTDatasetConfig(seq_length, seed=seed, cache_dir=os.path.join(directory, "cache"))
    t0 = time.perf_counter()
    indexed = IndexedDataset(prefix)
    t1 = time.perf_counter()
    first = GPTDataset(indexed, (0, len(sizes)), num_samples, config)
    t2 = time.perf_counter()
    again = GPTDataset(indexed, (0, len(sizes)), num_samples, config)
    t3 = time.perf_counter()
    assert first.index_built and not again.index_built
    return {"indexed_dataset_open": round(t1 - t0, 4), "gpt_dataset_build": round(t2 - t1, 4),
            "gpt_dataset_open_cached": round(t3 - t2, 4)}


def rounded(times: dict) -> dict:
    return {k: round(v, 4) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=2_000_000, help="number of documents")
    p.add_argument("--mean-length", type=int, default=500, help="mean document length in tokens")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeat", type=int, default=3, help="rounds (best of each is reported)")
    p.add_argument("--no-megatron", action="store_true", help="skip megatron-core's path")
    p.add_argument("--reference", action="store_true",
                   help="also time the pure-Python/numpy twins (slow: seconds per 1B tokens)")
    p.add_argument("--no-dataset", action="store_true",
                   help="skip the GPTDataset open measurement (it writes the .idx, 20 bytes per "
                        "document, and a sparse .bin)")
    p.add_argument("--tmp-dir", default=None,
                   help="where the cache entries and synthetic token files go (default: the "
                        "system temporary directory; removed afterwards)")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2 * args.mean_length, size=args.documents, dtype=np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (tokens - 1) // args.seq_length
    result = {"benchmark": "index_build", "documents": args.documents, "tokens": tokens,
              "seq_length": args.seq_length, "num_samples": num_samples,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus"}

    best, best_megatron, ratios, identical = None, None, [], True
    for _ in range(args.repeat):  # alternate, so both see the same machine load
        arrays, times = build_twin(_C, _C.LegacyRandomState(args.seed), sizes, tokens,
                                   args.seq_length, num_samples)
        if best is None or times["total"] < best["total"]:
            best = times
        if not args.no_megatron:
            theirs, their_times = build_megatron(sizes, tokens, args.seq_length, num_samples,
                                                 args.seed)
            identical = identical and same(arrays, theirs)
            ratios.append(times["total"] / their_times["total"])
            if best_megatron is None or their_times["total"] < best_megatron["total"]:
                best_megatron = their_times
            del theirs
    result["megalite_seconds"] = rounded(best)
    result["index_bytes"] = {n: int(a.nbytes) for n, a in arrays.items()}
    if not args.no_megatron:
        result["megatron_core_seconds"] = rounded(best_megatron)
        result["megalite_over_megatron"] = round(best["total"] / best_megatron["total"], 3)
        result["ratio_per_round"] = [round(r, 3) for r in ratios]
        result["identical_to_megatron"] = identical

    if args.reference:
        ref_arrays, ref_times = build_twin(ref, np.random.RandomState(args.seed), sizes, tokens,
                                           args.seq_length, num_samples)
        result["reference_seconds"] = rounded(ref_times)
        result["identical_to_reference"] = same(arrays, ref_arrays)
        del ref_arrays

    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as cache:
        description = {"kind": "benchmark", "documents": args.documents, "seed": args.seed}
        t0 = time.perf_counter()
        load_or_build(cache, description, NAMES, lambda: arrays)
        t1 = time.perf_counter()
        opened, built = load_or_build(cache, description, NAMES, lambda: arrays)
        t2 = time.perf_counter()
        assert not built and all(np.array_equal(opened[n], arrays[n]) for n in NAMES)
        result["cache_write_seconds"] = round(t1 - t0, 4)
        result["cache_open_seconds"] = round(t2 - t1, 6)
    del arrays, opened
    if not args.no_dataset:
        with tempfile.TemporaryDirectory(dir=args.tmp_dir) as directory:
            result["dataset_seconds"] = measure_dataset_open(sizes, args.seq_length, num_samples,
                                                             args.seed, directory)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
