"""``megalite quickstart``: the main job on an embedded default corpus, with no download.

Steps (each prints what it did and how long it took):

1. write a jsonl corpus from text every Python installation carries (pydoc topics, stdlib docstrings);
2. train a SentencePiece tokenizer on it;
3. tokenize it into Megatron-compatible ``.bin/.idx`` token files with 2 worker processes;
4. build the train/valid/test GPT datasets (split, shuffled document/sample/shuffle indices, cached)
   and decode one training sample.

Pretraining on these files is added by the training issue; until then this is the whole data path.
"""
from __future__ import annotations

import argparse
import os
import time

from megalite.errors import MegaliteError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalite quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/quickstart",
                   help="where the corpus, tokenizer, token files and index cache go (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=4000, help="SentencePiece vocabulary size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer worker processes (default: %(default)s)")
    p.add_argument("--seq-length", type=int, default=256, help="GPT sample length (default: %(default)s)")
    p.add_argument("--train-samples", type=int, default=10000,
                   help="number of training samples to index (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="shuffling seed (default: %(default)s)")
    return p


def _step(title: str):
    print(f"==> {title}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"    {what} ({time.perf_counter() - t0:.1f} s)", flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.vocab_size < 100:
        raise MegaliteError(f"--vocab-size {args.vocab_size} is too small (at least 100)")
    from megalite.data.blended import build_train_valid_test_datasets
    from megalite.data.builtin_corpus import write_builtin_corpus
    from megalite.data.tokenizers import build_tokenizer
    from megalite.tools import preprocess_data, train_tokenizer

    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, "corpus.jsonl")
    tok_prefix = os.path.join(out, "tokenizer")
    data_prefix = os.path.join(out, "corpus")

    t0 = _step("writing the built-in corpus (pydoc topics + standard-library docstrings)")
    n_docs = write_builtin_corpus(corpus)
    _done(t0, f"{n_docs} documents, {os.path.getsize(corpus) / 1e6:.1f} MB -> {corpus}")

    t0 = _step(f"training a SentencePiece BPE tokenizer (vocab {args.vocab_size})")
    train_tokenizer.main(["--input", corpus, "--output-prefix", tok_prefix, "--vocab-size",
                          str(args.vocab_size), "--model-type", "bpe",
                          "--character-coverage", "1.0", "--byte-fallback"])
    _done(t0, f"-> {tok_prefix}.model")

    t0 = _step(f"tokenizing into .bin/.idx with {args.workers} workers")
    preprocess_data.main(["--input", corpus, "--output-prefix", data_prefix,
                          "--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", tok_prefix + ".model", "--append-eod",
                          "--workers", str(args.workers), "--log-interval", "5000"])
    token_prefix = data_prefix + "_text_document"
    _done(t0, f"-> {token_prefix}.bin/.idx")

    t0 = _step("building GPT train/valid/test datasets (split 969,30,1)")
    train, valid, test = build_train_valid_test_datasets(
        [token_prefix], "969,30,1", (args.train_samples, 100, 10), args.seq_length, args.seed,
        cache_dir=os.path.join(out, "index-cache"))
    _done(t0, f"train {len(train)} / valid {len(valid) if valid else 0} / "
              f"test {len(test) if test else 0} samples of {args.seq_length + 1} tokens")

    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=tok_prefix + ".model")
    sample = train[0]
    text = tokenizer.decode([int(t) for t in sample[:48]])
    print(f"==> first training sample (48 of {len(sample)} tokens, decoded):\n    {text!r}")
    return 0
