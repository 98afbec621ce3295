"""``megalite merge-datasets`` (also ``tools/preprocess/merge_datasets.py``): concatenate datasets.

Inputs are dataset prefixes (``PREFIX`` of ``PREFIX.bin``/``PREFIX.idx``; a path ending in
``.bin`` or ``.idx`` is taken as its prefix), globs of those, or directories: a directory means
every dataset in it (all must be numbered variants of one name, such as the shards of one key).
Within a directory or glob the datasets are merged in natural order
(``shard2`` before ``shard10``), so the shards of ``megalite preprocess --num-shards`` come back in
shard order; explicit prefixes keep the order given (a dataset named twice is included twice).

Nothing is dropped silently: a ``.idx`` without its ``.bin`` (or the reverse) is an error naming
the file, and datasets whose names say ``I-of-N`` (``_shard00001-of-00003_``) must come as a
complete set 0..N-1, or the merge is refused naming the missing shards (what a failed job-array
task leaves behind).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time

from megalite.errors import MegaliteError
from megalite.dataprep.jsonl_input import HelpFormatter


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
                        "directories and globs expand in natural sort order (shard2 < shard10). "
                        "Datasets named I-of-N (shard00001-of-00003) must come as the complete set "
                        "0..N-1, and every dataset needs both its .bin and .idx: anything missing "
                        "is an error naming it")
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
    """Prefixes of the .bin/.idx files among ``paths``, naturally sorted; a prefix with only one
    of its two files is an error naming the file that is there and the one that is missing."""
    prefixes = {_strip_suffix(p) for p in paths if p.endswith((".bin", ".idx"))}
    for prefix in prefixes:
        _check_pair(prefix)
    return sorted(prefixes, key=natural_key)


def _check_pair(prefix: str) -> None:
    have = [ext for ext in (".bin", ".idx") if os.path.isfile(prefix + ext)]
    if len(have) == 1:
        missing = ".idx" if have == [".bin"] else ".bin"
        raise MegaliteError(f"{prefix}{have[0]} has no {prefix}{missing}: an incomplete dataset "
                            f"(an interrupted or failed run?); rerun the job that writes it")


_SHARD_TAG = re.compile(r"(\d+)-of-(\d+)")


def check_shard_sets(prefixes) -> None:
    """Refuse an incomplete set of ``I-of-N`` shards: every shard 0..N-1 of a name must be there.

    Shards of one name are those whose paths differ only in ``I`` and ``N``; one name may not come
    with two different ``N`` (the shards of two runs) either.
    """
    groups: dict[str, dict[int, tuple]] = {}  # name with I, N blanked -> N -> (template, indices)
    for prefix in prefixes:
        path = os.path.abspath(prefix)
        base = len(path) - len(os.path.basename(path))
        tags = list(_SHARD_TAG.finditer(path, base))
        if not tags:
            continue
        tag = tags[-1]
        head, tail, width = path[:tag.start()], path[tag.end():], len(tag.group(1))
        total = int(tag.group(2))
        esc = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731 (braces in paths)
        template = f"{esc(head)}{{i:0{width}d}}-of-{tag.group(2)}{esc(tail)}"
        entry = groups.setdefault(f"{head}*-of-*{tail}", {}).setdefault(total, (template, set()))
        entry[1].add(int(tag.group(1)))
    for key, by_total in groups.items():
        if len(by_total) > 1:
            totals = " and ".join(str(n) for n in sorted(by_total))
            raise MegaliteError(f"--input: the shards {key} come from runs with different shard "
                                f"counts ({totals}); merge the shards of one run")
        (total, (template, have)), = by_total.items()
        beyond = sorted(i for i in have if i >= total)
        if beyond:
            raise MegaliteError(f"--input: {template.format(i=beyond[0])} says shard {beyond[0]} "
                                f"of {total}, which does not exist (shards are 0..{total - 1})")
        missing = [i for i in range(total) if i not in have]
        if missing:
            shown = ", ".join(template.format(i=i) for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise MegaliteError(
                f"--input: {len(missing)} of {total} shards are missing: {shown}{more} (.bin/.idx); "
                f"a failed or unfinished job-array task? rerun it (--shard-index {missing[0]} "
                f"--num-shards {total}) before merging")


def resolve_prefixes(inputs) -> list[str]:
    """Expand ``--input`` values to dataset prefixes; errors name the value that matched nothing,
    an incomplete .bin/.idx pair, or the missing shards of an ``I-of-N`` set."""
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
                _check_pair(prefix)
                found = [prefix]
            else:
                found = _datasets_in(glob.glob(item) + glob.glob(item + ".idx") +
                                     glob.glob(item + ".bin"))
                if not found:
                    raise MegaliteError(f"--input {item}: no dataset {prefix}.bin/.idx "
                                        f"(and nothing matches it as a glob)")
        prefixes.extend(found)
    check_shard_sets(prefixes)
    return prefixes


def main(argv=None) -> int:
    from megalite.data.indexed import (IndexedDataset, check_output_parent, merge_datasets,
                                       remove_stale_temporaries)

    args = build_parser().parse_args(argv)
    check_output_parent(args.output_prefix, "--output-prefix")
    prefixes = resolve_prefixes(args.input)
    out = os.path.abspath(args.output_prefix)
    if out in {os.path.abspath(p) for p in prefixes}:
        raise MegaliteError(f"--output-prefix {args.output_prefix} is also an input")
    for path in remove_stale_temporaries(args.output_prefix):  # an earlier merge was kill -9'ed
        print(f"removed {path}, left by an earlier run that did not finish", file=sys.stderr)
    t0 = time.perf_counter()
    merge_datasets(prefixes, args.output_prefix)
    merged = IndexedDataset(args.output_prefix)
    print(f"merged {len(prefixes)} datasets ({merged.num_documents} documents, {merged.num_tokens} "
          f"tokens, {merged.dtype}) in {time.perf_counter() - t0:.1f} s into "
          f"{args.output_prefix}.bin/.idx", file=sys.stderr)
    return 0
