"""``megalite builtin-corpus``: write the built-in corpus (what ``megalite quickstart`` trains
on: the pydoc topics and standard-library docstrings of this Python, no download) as jsonl
``{"text": ...}`` lines; see :mod:`megalite.data.builtin_corpus`."""
from __future__ import annotations

import argparse
import os
import sys

from megalite.dataprep.jsonl_input import HelpFormatter
from megalite.errors import MegaliteError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite builtin-corpus", formatter_class=HelpFormatter,
        description="Write the built-in English corpus (about 3,000 documents, 2 MB: the pydoc "
                    "topics and standard-library docstrings every Python installation carries; "
                    "nothing downloaded) as jsonl lines {\"text\": ...}, the first step of "
                    "megalite quickstart. The bytes depend on the Python version only.",
        epilog="Example: megalite builtin-corpus --output corpus.jsonl")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="the jsonl file to write (through a temporary name renamed into place)")
    p.add_argument("--max-documents", type=int, default=None, metavar="N",
                   help="keep only the first N documents (default: all)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_documents is not None and args.max_documents < 1:
        raise MegaliteError(f"--max-documents {args.max_documents} must be at least 1")
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise MegaliteError(f"--output {args.output}: no directory {directory}")
    from megalite.data.builtin_corpus import write_builtin_corpus
    n = write_builtin_corpus(args.output, args.max_documents)
    print(f"wrote {n} documents ({os.path.getsize(args.output) / 1e6:.1f} MB) to {args.output}",
          file=sys.stderr)
    return 0
