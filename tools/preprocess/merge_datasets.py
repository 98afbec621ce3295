#!/usr/bin/env python3
"""Merge several .bin/.idx datasets into one (e.g. the shards of a sharded preprocess run).

Same as `megalite merge-datasets`; run `python tools/preprocess/merge_datasets.py --help`.
The work is in :mod:`megalite.dataprep.merge_datasets`; this script only turns errors into one clean line.
"""
import os
import sys

# Run from a source checkout without `pip install`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megalite.cli import run_main  # noqa: E402
from megalite.dataprep.merge_datasets import main  # noqa: E402

if __name__ == "__main__":  # guard: worker processes (spawn) import this file
    sys.exit(run_main(main, sys.argv[1:]))
