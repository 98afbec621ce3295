"""Benchmark: GPT dataset index building (C++ vs the Python reference in tests/) and cached-index opening.

Synthetic corpora are just arrays of document lengths (the index builders never read tokens):
lengths uniform in [1, 2 * mean - 1], so ``documents * mean`` tokens on average. One epoch's
worth of samples is indexed (``(tokens - 1) // seq_length``), as in a one-epoch pretraining run.

Prints one JSON object per measured corpus, e.g.::

    python benchmarks/index_build.py                          # 1B tokens, C++ and reference
    python benchmarks/index_build.py --documents 200000000 --no-reference   # 100B tokens, C++

Timings are wall-clock seconds of one run (best of ``--repeat`` for the C++ builders).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

# The pure-Python twins are a test oracle and live in tests/, not in the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import index_reference as ref  # noqa: E402

from megalite import _C  # noqa: E402
from megalite.data.gpt_dataset import final_epoch_split, num_epochs
from megalite.data.index_cache import load_or_build

NAMES = ["document_index", "sample_index", "shuffle_index"]


def build(impl, sizes: np.ndarray, tokens: int, seq_length: int, num_samples: int, seed: int):
    """The three arrays as GPTDataset builds them; returns (arrays, seconds per array)."""
    epochs = num_epochs(tokens, seq_length, num_samples)
    first = final_epoch_split(tokens, seq_length, num_samples)
    times = {}
    t0 = time.perf_counter()
    doc = impl.build_document_index(0, len(sizes), epochs, first is not None, seed)
    t1 = time.perf_counter()
    sample = impl.build_sample_index(sizes, doc, seq_length, num_samples)
    t2 = time.perf_counter()
    shuffle = impl.build_shuffle_index(num_samples, num_samples if first is None else first,
                                       seed + 1)
    t3 = time.perf_counter()
    times = {"document_index": t1 - t0, "sample_index": t2 - t1, "shuffle_index": t3 - t2,
             "total": t3 - t0}
    return {"document_index": doc, "sample_index": sample, "shuffle_index": shuffle}, times


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
    p.add_argument("--repeat", type=int, default=3, help="C++ runs (best is reported)")
    p.add_argument("--no-reference", action="store_true", help="skip the Python reference")
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

    best = None
    for _ in range(args.repeat):
        arrays, times = build(_C, sizes, tokens, args.seq_length, num_samples, args.seed)
        if best is None or times["total"] < best["total"]:
            best = times
    result["cpp_seconds"] = rounded(best)
    result["index_bytes"] = {n: int(a.nbytes) for n, a in arrays.items()}

    if not args.no_reference:
        ref_arrays, ref_times = build(ref, sizes, tokens, args.seq_length, num_samples, args.seed)
        result["reference_seconds"] = rounded(ref_times)
        result["speedup"] = round(ref_times["total"] / best["total"], 1)
        result["identical"] = all(np.array_equal(arrays[n], ref_arrays[n]) for n in NAMES)
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
