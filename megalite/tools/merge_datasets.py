"""``megalite merge-datasets`` (also ``tools/preprocess/merge_datasets.py``): concatenate datasets.

Inputs are dataset prefixes (``PREFIX`` of ``PREFIX.bin``/``PREFIX.idx``; a path ending in
``.bin`` or ``.idx`` is taken as its prefix), globs of those, or directories: a directory means
every dataset in it (all must be numbered variants of one name, such as the shards of one key).
Within a directory or glob the datasets are merged in natural order
(``shard2`` before ``shard10``), so the shards of ``megalite preprocess --num-shards`` come back in
shard order; explicit prefixes keep the order given (a dataset named twice is included twice).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time

from megalite.errors import MegaliteError
from megalite.tools.jsonl_input import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite merge-datasets",
        description="Merge MMIDIDX datasets (.bin/.idx pairs of one dtype) into one, in order. "
                    "Merging the shards 0..N-1 of a sharded `megalite preprocess` run gives the "
                    "unsharded output byte for byte.",
        formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="DIR_OR_PREFIX",
                   help="dataset prefixes (PREFIX.bin/PREFIX.idx; a .bin/.idx path works too), "
                        "globs of them (quoted), or directories (every dataset inside, which must "
                        "be numbered variants of one name, e.g. the shards of one key); "
                        "directories and globs expand in natural sort order (shard2 < shard10)")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    return p


def natural_key(text: str):
    """Sort key treating digit runs as numbers: ``a2`` < ``a10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", text)]


def _strip_suffix(path: str) -> str:
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _datasets_in(paths) -> list[str]:
    """Prefixes with both files present among ``paths`` (any of .bin/.idx), naturally sorted."""
    prefixes = {_strip_suffix(p) for p in paths if p.endswith((".bin", ".idx"))}
    found = [p for p in prefixes if os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")]
    return sorted(found, key=natural_key)


def resolve_prefixes(inputs) -> list[str]:
    """Expand ``--input`` values to dataset prefixes; errors name the value that matched nothing."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = _datasets_in(os.path.join(item, name) for name in os.listdir(item))
            if not found:
                raise MegaliteError(f"--input {item}: the directory holds no .bin/.idx dataset")
            # Shards differ only in their numbers; anything else (e.g. the _text_ and _title_
            # datasets of one run) must not be merged together by accident.
            kinds = sorted({re.sub(r"\d+", "N", os.path.basename(p)) for p in found})
            if len(kinds) > 1:
                raise MegaliteError(f"--input {item}: the directory holds datasets of several kinds "
                                    f"({', '.join(kinds)}); name the ones to merge with a glob, "
                                    f"e.g. '{item}/*_text_document'")
        else:
            prefix = _strip_suffix(item)
            if os.path.isfile(prefix + ".idx") or os.path.isfile(prefix + ".bin"):
                found = [prefix]
            else:
                found = _datasets_in(glob.glob(item) + glob.glob(item + ".idx"))
                if not found:
                    raise MegaliteError(f"--input {item}: no dataset {prefix}.bin/.idx "
                                        f"(and nothing matches it as a glob)")
        for prefix in found:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise MegaliteError(f"--input {item}: {prefix}{ext} is missing")
        prefixes.extend(found)
    return prefixes


def main(argv=None) -> int:
    from megalite.data.indexed import IndexedDataset, merge_datasets

    args = build_parser().parse_args(argv)
    prefixes = resolve_prefixes(args.input)
    out = os.path.abspath(args.output_prefix)
    if out in {os.path.abspath(p) for p in prefixes}:
        raise MegaliteError(f"--output-prefix {args.output_prefix} is also an input")
    t0 = time.perf_counter()
    merge_datasets(prefixes, args.output_prefix)
    merged = IndexedDataset(args.output_prefix)
    print(f"merged {len(prefixes)} datasets ({merged.num_documents} documents, {merged.num_tokens} "
          f"tokens, {merged.dtype}) in {time.perf_counter() - t0:.1f} s into "
          f"{args.output_prefix}.bin/.idx", file=sys.stderr)
    return 0
