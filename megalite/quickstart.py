"""``megalite quickstart``: the main job on an embedded default corpus, with no download.

Steps (each prints what it did and how long it took):

1. write a jsonl corpus from text every Python installation carries (pydoc topics, stdlib docstrings);
2. train a SentencePiece tokenizer on it;
3. tokenize it into Megatron-compatible ``.bin/.idx`` token files with 2 worker processes;
4. pretrain a small LLaMA-recipe GPT on it with tensor parallelism 2 x pipeline parallelism 2 in 4
   processes (``torchrun``), logging loss, throughput and MFU, with validation, and save a checkpoint;
5. load that checkpoint into a single process (another layout) and generate a continuation.

Everything lands in ``--output-dir``: ``corpus.jsonl``, ``tokenizer.model``,
``corpus_text_document.{bin,idx}``, ``checkpoints/``, ``train_log.jsonl``, ``tensorboard/``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from megalite.errors import MegaliteError

# The model and optimizer settings of the quickstart (a packaged YAML, also a usable example).
QUICKSTART_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "quickstart.yaml")


def tokenizer_args(corpus: str, output_prefix: str, vocab_size: int) -> list[str]:
    """``megalite train-tokenizer`` arguments of the quickstart's tokenizer (the HF export
    tests train theirs with the same)."""
    return ["--input", corpus, "--output-prefix", output_prefix, "--vocab-size",
            str(vocab_size), "--model-type", "bpe", "--character-coverage", "1.0",
            "--byte-fallback"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalite quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/quickstart",
                   help="where every output goes (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=2000,
                   help="SentencePiece vocabulary size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="tokenizer worker processes (default: %(default)s)")
    p.add_argument("--train-iters", type=int, default=250,
                   help="training iterations (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=4, choices=(1, 2, 4),
                   help="training processes: 4 = TP 2 x PP 2, 2 = TP 2, 1 = single (default: 4)")
    p.add_argument("--prompt", default="The return statement",
                   help="prompt for the sample at the end (default: %(default)r)")
    p.add_argument("--seed", type=int, default=1234, help="seed (default: %(default)s)")
    return p


def _step(title: str):
    print(f"==> {title}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"    {what} ({time.perf_counter() - t0:.1f} s)", flush=True)


def _run(cmd: list[str]) -> None:
    """Run a megalite command in a child process; its failure ends the quickstart clearly."""
    rc = subprocess.call(cmd)
    if rc:
        raise MegaliteError(f"step failed with exit status {rc}: {' '.join(cmd)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.vocab_size < 300:
        raise MegaliteError(f"--vocab-size {args.vocab_size} is too small (at least 300: the "
                            "tokenizer holds 256 byte pieces)")
    if args.train_iters < 1:
        raise MegaliteError(f"--train-iters {args.train_iters} must be at least 1")
    from megalite.data.builtin_corpus import write_builtin_corpus
    from megalite.dataprep import preprocess_data, train_tokenizer

    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, "corpus.jsonl")
    tok_model = os.path.join(out, "tokenizer.model")
    data_prefix = os.path.join(out, "corpus")
    checkpoints = os.path.join(out, "checkpoints")

    t0 = _step("writing the built-in corpus (pydoc topics + standard-library docstrings)")
    n_docs = write_builtin_corpus(corpus)
    _done(t0, f"{n_docs} documents, {os.path.getsize(corpus) / 1e6:.1f} MB -> {corpus}")

    t0 = _step(f"training a SentencePiece BPE tokenizer (vocab {args.vocab_size})")
    train_tokenizer.main(tokenizer_args(corpus, tok_model[:-len(".model")], args.vocab_size))
    _done(t0, f"-> {tok_model}")

    t0 = _step(f"tokenizing into .bin/.idx with {args.workers} workers")
    preprocess_data.main(["--input", corpus, "--output-prefix", data_prefix,
                          "--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", tok_model, "--append-eod",
                          "--workers", str(args.workers), "--log-interval", "5000"])
    token_prefix = data_prefix + "_text_document"
    _done(t0, f"-> {token_prefix}.bin/.idx")

    tp, pp = {1: (1, 1), 2: (2, 1), 4: (2, 2)}[args.nproc]
    layout = f"TP={tp} x PP={pp} in {args.nproc} process{'es' if args.nproc > 1 else ''}"
    t0 = _step(f"pretraining a small LLaMA-recipe GPT, {layout}")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(args.nproc)] if args.nproc > 1 else [sys.executable]
    _run(launcher + [
        "-m", "megalite", "train", "--config", QUICKSTART_CONFIG,
        "--data-path", token_prefix, "--split", "98,2,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok_model,
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--train-iters", str(args.train_iters), "--seed", str(args.seed),
        "--save", checkpoints, "--log-json", os.path.join(out, "train_log.jsonl"),
        "--tensorboard-dir", os.path.join(out, "tensorboard")])
    _done(t0, f"checkpoint -> {checkpoints}")

    t0 = _step(f"generating from the checkpoint in one process (prompt {args.prompt!r})")
    _run([sys.executable, "-m", "megalite", "generate", "--load", checkpoints,
          "--prompt", args.prompt, "--max-new-tokens", "40", "--top-k", "20",
          "--temperature", "0.8", "--seed", str(args.seed)])
    _done(t0, "done")
    return 0
