"""Random-access reads from MMIDIDX token files, and builder write throughput.

    python benchmarks/random_access.py [--tokens 100000000] [--reads 200000] [--dir DIR] [--keep]

Builds a synthetic uint16 dataset (random token ids; document lengths uniform in
[--min-doc, --max-doc]) with the C++ builder, and a second copy with a plain-Python writer
(``ndarray.astype(uint16).tofile`` per document, numpy for the index) to compare write throughput
in the same run; all writers fsync and rename, so they do the same work. The C++ builder runs
twice: ``add_document`` per document, and ``add_documents`` per batch of ``--batch`` documents
(given already concatenated, as preprocessing workers return them). Each writer runs
``--repeats`` times, alternating, and the median is reported. The builder is fed int64 arrays,
as a tokenizer produces them, so every writer converts int64 -> uint16. Writing is measured twice:
for long documents (the read dataset) and for short ones ([--short-min-doc, --short-max-doc]),
where the per-document call overhead dominates.

Then it opens the dataset (full validation) and times random reads, page cache warm (the files
were just written; dropping caches would disturb other users of the machine):

* ``get_view``: ``ds.get(seq, offset, 2049)`` at a random offset of a random sequence that is at
  least 2049 tokens long; the view alone (zero-copy, touches only the index).
* ``get_copy``: the same, materialised as ``np.array(view, dtype=np.int64)`` like a sample.
* ``document_copy``: ``ds.document(d)`` for a random document, copied to int64.

the time to open (and fully validate) an index of ``--validate-sequences`` one-token documents,
and ``merge_datasets`` of the dataset with itself (block copy of the .bin). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time

import numpy as np

from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder, merge_datasets


def make_documents(tokens: int, min_doc: int, max_doc: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_doc, max_doc, endpoint=True, size=tokens // min_doc + 1)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    lengths[-1] -= int(lengths.sum()) - tokens  # exactly `tokens` in total
    flat = rng.integers(0, 65000, size=tokens, dtype=np.int64)
    return np.split(flat, np.cumsum(lengths)[:-1])


def write_cpp(prefix: str, docs) -> None:
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in docs:
            b.add_document(d)
        b.finalize()


def write_cpp_batched(prefix: str, batches) -> None:
    """``add_documents``: one call per batch of documents, as a tokenizer worker returns them."""
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for flat, lengths in batches:
            b.add_documents(flat, lengths)
        b.finalize()


def write_python(prefix: str, docs) -> None:
    """The baseline: what one would write without the C++ builder (same temp + fsync + rename)."""
    tmp_bin, tmp_idx = prefix + ".bin.tmp", prefix + ".idx.tmp"
    lengths = []
    with open(tmp_bin, "wb") as f:
        for d in docs:
            d.astype(np.uint16).tofile(f)
            lengths.append(len(d))
        f.flush()
        os.fsync(f.fileno())
    lengths = np.array(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * 2, out=pointers[1:])
    with open(tmp_idx, "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(lengths), len(lengths) + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, prefix + ".idx")


def compare_writers(cpp_prefix: str, py_prefix: str, docs, repeats: int, batch: int) -> dict:
    """Median write throughput of the three writers over ``repeats`` alternating runs; checks that
    their outputs are identical. The batches for ``add_documents`` are made before timing."""
    tokens = sum(len(d) for d in docs)
    batches = [(np.concatenate(docs[i:i + batch]), [len(d) for d in docs[i:i + batch]])
               for i in range(0, len(docs), batch)]
    cpp_s, bulk_s, py_s = [], [], []
    for _ in range(repeats):
        py_s.append(timed(write_python, py_prefix, docs))
        bulk_s.append(timed(write_cpp_batched, cpp_prefix + "_bulk", batches))
        cpp_s.append(timed(write_cpp, cpp_prefix, docs))
    identical = True
    for other in (py_prefix, cpp_prefix + "_bulk"):
        for ext in (".bin", ".idx"):
            with open(cpp_prefix + ext, "rb") as a, open(other + ext, "rb") as b:
                identical &= a.read() == b.read()
    return {
        "cpp_builder_tokens_per_s": rate(tokens, statistics.median(cpp_s)),
        "cpp_add_documents_tokens_per_s": rate(tokens, statistics.median(bulk_s)),
        "python_tofile_tokens_per_s": rate(tokens, statistics.median(py_s)),
        "cpp_seconds": [round(s, 3) for s in cpp_s], "cpp_add_documents_seconds": [round(s, 3) for s in bulk_s],
        "python_seconds": [round(s, 3) for s in py_s], "add_documents_batch": batch,
        "outputs_identical": identical,
    }


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000_000, help="dataset size in tokens (default: %(default)s)")
    p.add_argument("--min-doc", type=int, default=512, help="shortest document (default: %(default)s)")
    p.add_argument("--max-doc", type=int, default=8192, help="longest document (default: %(default)s)")
    p.add_argument("--short-min-doc", type=int, default=20,
                   help="shortest document of the short-document write test (default: %(default)s)")
    p.add_argument("--short-max-doc", type=int, default=600,
                   help="longest document of the short-document write test (default: %(default)s)")
    p.add_argument("--sample-length", type=int, default=2049, help="tokens per random read (default: %(default)s)")
    p.add_argument("--reads", type=int, default=200_000, help="random reads per measurement (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each writer; median reported (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1024,
                   help="documents per add_documents call in the batched writer (default: %(default)s)")
    p.add_argument("--validate-sequences", type=int, default=10_000_000,
                   help="sequences in the index whose open+validate time is measured (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="work directory (default: a fresh temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the files written")
    args = p.parse_args(argv)
    if args.max_doc < args.sample_length:
        p.error("--max-doc must be at least --sample-length")

    work = args.dir or tempfile.mkdtemp(prefix="megalite-bench-")
    os.makedirs(work, exist_ok=True)
    out: dict = {"benchmark": "random_access", "python": platform.python_version(), "numpy": np.__version__,
                 "cpus": os.cpu_count(), "tokens": args.tokens, "dtype": "uint16"}
    try:
        cpp_prefix, py_prefix = os.path.join(work, "cpp"), os.path.join(work, "py")
        out["write"] = {}
        # Short documents last, so that the long-document dataset is the one left for reading.
        for name, lo, hi in (("short_documents", args.short_min_doc, args.short_max_doc),
                             ("long_documents", args.min_doc, args.max_doc)):
            docs = make_documents(args.tokens, lo, hi, args.seed)
            out["write"][name] = compare_writers(cpp_prefix, py_prefix, docs, args.repeats, args.batch)
            out["write"][name].update(documents=len(docs), doc_length_range=[lo, hi])
            del docs

        t0 = time.perf_counter()
        ds = IndexedDataset(cpp_prefix)
        out["open_and_validate_s"] = round(time.perf_counter() - t0, 4)

        rng = np.random.default_rng(args.seed + 1)
        lengths = ds.sequence_lengths.astype(np.int64)
        eligible = np.flatnonzero(lengths >= args.sample_length)
        seqs = rng.choice(eligible, size=args.reads)
        offsets = (rng.random(args.reads) * (lengths[seqs] - args.sample_length + 1)).astype(np.int64)
        pairs = list(zip(seqs.tolist(), offsets.tolist()))
        n, L = args.sample_length, args.sample_length

        t0 = time.perf_counter()
        for i, o in pairs:
            ds.get(i, o, L)
        view_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        checksum = 0
        for i, o in pairs:
            checksum += int(np.array(ds.get(i, o, L), dtype=np.int64)[-1])
        copy_s = time.perf_counter() - t0
        doc_ids = rng.integers(0, ds.num_documents, size=args.reads // 4).tolist()
        t0 = time.perf_counter()
        doc_tokens = 0
        for d in doc_ids:
            doc_tokens += len(np.array(ds.document(d), dtype=np.int64))
        doc_s = time.perf_counter() - t0
        out["reads"] = {
            "sample_length": n, "warm_page_cache": True,
            "get_view_per_s": rate(len(pairs), view_s),
            "get_copy_per_s": rate(len(pairs), copy_s),
            "get_copy_tokens_per_s": rate(len(pairs) * n, copy_s),
            "document_copy_per_s": rate(len(doc_ids), doc_s),
            "document_copy_tokens_per_s": rate(doc_tokens, doc_s),
            "checksum": checksum,
        }
        del ds

        # Validation cost on open grows with the number of sequences, not tokens: time it on an
        # index of many one-token documents.
        many = os.path.join(work, "many")
        with IndexedDatasetBuilder(many, np.uint16) as b:
            for lo in range(0, args.validate_sequences, 1 << 20):
                k = min(1 << 20, args.validate_sequences - lo)
                b.add_documents(np.ones(k, np.int64), np.ones(k, np.int64))
            b.finalize()
        t0 = time.perf_counter()
        IndexedDataset(many)
        out["open_and_validate_many"] = {"sequences": args.validate_sequences,
                                         "seconds": round(time.perf_counter() - t0, 4)}

        merged = os.path.join(work, "merged")
        merge_s = timed(merge_datasets, [cpp_prefix, cpp_prefix], merged)
        out["merge"] = {"inputs": 2, "output_bytes": os.path.getsize(merged + ".bin"), "seconds": round(merge_s, 3),
                        "bin_MB_per_s": round(os.path.getsize(merged + ".bin") / merge_s / 1e6, 1)}
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
