"""``megalite <subcommand> ...`` (also ``python -m megalite``).

Each subcommand lives in its own module exposing ``main(argv) -> int``; it is imported only
when asked for, so ``megalite --help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

from megalite.errors import MegaliteError

# name -> (module, one-line summary)
SUBCOMMANDS = {
    "quickstart": ("megalite.quickstart", "run the main job on the built-in corpus (no downloads)"),
    "train": ("megalite.training.main",
              "pretrain a GPT, BERT or T5 model (YAML config + Megatron-LM flags)"),
    "generate": ("megalite.generate", "continue a prompt from a checkpoint (KV cache, any TP size)"),
    "preprocess": ("megalite.dataprep.preprocess_data", "tokenize jsonl into .bin/.idx token files"),
    "merge-datasets": ("megalite.dataprep.merge_datasets", "merge several .bin/.idx datasets into one"),
    "train-tokenizer": ("megalite.dataprep.train_tokenizer",
                        "train a SentencePiece model or a BERT WordPiece vocab.txt from jsonl"),
    "builtin-corpus": ("megalite.dataprep.write_corpus",
                       "write the built-in corpus (the quickstart's text) as jsonl"),
    "convert": ("megalite.convert.cli", "checkpoints to/from Hugging Face, or to another TP/PP"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: megalite <subcommand> [options]   (megalite <subcommand> --help for details)", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def run_main(main, argv) -> int:
    """Run a tool's ``main``; a :class:`MegaliteError` becomes one line on stderr and exit 2."""
    try:
        return int(main(argv) or 0)
    except MegaliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return run_main(module.main, rest)
