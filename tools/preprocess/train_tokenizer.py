#!/usr/bin/env python3
"""Train a SentencePiece tokenizer from jsonl.

Same as `megalite train-tokenizer`; run `python tools/preprocess/train_tokenizer.py --help`.
The work is in :mod:`megalite.dataprep.train_tokenizer`; this script only turns errors into one clean line.
"""
import os
import sys

# Run from a source checkout without `pip install`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megalite.cli import run_main  # noqa: E402
from megalite.dataprep.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":  # guard: worker processes (spawn) import this file
    sys.exit(run_main(main, sys.argv[1:]))
