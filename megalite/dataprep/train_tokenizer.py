"""``megalite train-tokenizer``: train a SentencePiece model (or, with ``--model-type
wordpiece``, a BERT WordPiece vocabulary: :mod:`megalite.dataprep.wordpiece_trainer`) from jsonl
text.

The text streams to SentencePiece through a sentence iterator (each non-empty line of each
document is one "sentence"); no whole-corpus temporary file is written. With
``--input-sentence-size N`` the lines go through a reservoir sample of N lines (Python's
``random.Random(--seed)``) first, which bounds memory. The sampling is done here rather than by
SentencePiece because SentencePiece seeds its generator once per process: a second training in
the same process would ignore ``--seed``.

Special pieces are always: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos: the end-of-document
id of ``SentencePieceTokenizer``), ``<pad>`` 3. ``PREFIX.model`` and ``PREFIX.vocab`` are
written under temporary names and renamed into place. The sentence stream and
``--input-sentence-size`` sampling are the same for WordPiece.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

from megalite.errors import MegaliteError
from megalite.dataprep.jsonl_input import HelpFormatter, iter_records, resolve_inputs
from megalite.dataprep.wordpiece_trainer import (SENTENCEPIECE_ONLY, output_path, train_vocab,
                                                 write_vocab)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megalite train-tokenizer",
        description="Train a SentencePiece tokenizer (BPE or unigram) from jsonl files; writes "
                    "OUTPUT_PREFIX.model and OUTPUT_PREFIX.vocab. Special ids: <unk> 0, <s> 1, "
                    "</s> 2 (eos, used as end-of-document), <pad> 3. With --model-type "
                    "wordpiece: a BERT WordPiece vocabulary (Hugging Face tokenizers' "
                    "WordPieceTrainer, BERT's normalizer and pre-tokenizer), written as "
                    "OUTPUT_PREFIX.vocab.txt, one token per line; ids 0-4 are [PAD] [UNK] [CLS] "
                    "[SEP] [MASK] as in BERT's vocab.txt.",
        epilog="Examples: megalite train-tokenizer --input 'data/*.jsonl' --output-prefix tok "
               "--vocab-size 32000 (-> tok.model, tok.vocab); megalite train-tokenizer --input "
               "corpus.jsonl --output-prefix wp --model-type wordpiece --vocab-size 30522 (-> "
               "wp.vocab.txt, for --tokenizer-type BertWordPieceLowerCase --vocab-file "
               "wp.vocab.txt; BertWordPieceCase with --no-lower-case).",
        formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="jsonl or jsonl.gz files, globs (quote them) or directories")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys whose string values are training text")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.model and PREFIX.vocab (wordpiece: PREFIX.vocab.txt)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="pieces in the model, specials included (wordpiece: at most this many; "
                        "fewer when the text has fewer distinct pieces)")
    p.add_argument("--model-type", choices=("bpe", "unigram", "wordpiece"), default="bpe",
                   help="bpe/unigram: SentencePiece algorithm (Llama-style models use bpe); "
                        "wordpiece: a BERT vocab.txt (BERT and T5 data)")
    wp = p.add_argument_group("wordpiece only")
    wp.add_argument("--no-lower-case", dest="lower_case", action="store_false",
                    help="keep case and accents (for BertWordPieceCase); the default lower-cases "
                         "and strips accents, as BertWordPieceLowerCase does")
    wp.add_argument("--min-frequency", type=int, default=0,
                    help="a merged piece must occur at least this many times")
    sp = p.add_argument_group("SentencePiece only (bpe, unigram)")
    sp.add_argument("--character-coverage", type=float, default=None,
                   help="fraction of characters the pieces must cover; rarer characters become "
                        "<unk> (or bytes with --byte-fallback). 0.9995 (the default) suits large "
                        "character sets (Chinese, Japanese); use 1.0 for small alphabets "
                        "(English, European languages)")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a random sample of this many sentences (lines); 0 = all")
    sp.add_argument("--max-sentence-length", type=int, default=None,
                   help="lines longer than this many bytes are skipped by SentencePiece "
                        "(default: 8192)")
    sp.add_argument("--byte-fallback", action="store_true", default=None,
                   help="add the 256 byte pieces, so unseen characters decompose into bytes instead of <unk>")
    sp.add_argument("--normalization", default=None,
                   choices=("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"),
                   help="SentencePiece normalization rule (identity keeps the text as it is; "
                        "default: nmt_nfkc)")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of the --input-sentence-size sample (and of SentencePiece's generator)")
    p.add_argument("--num-threads", type=int, default=min(16, os.cpu_count() or 1),
                   help="SentencePiece trainer threads (wordpiece: Hugging Face tokenizers "
                        "sizes its own pool; set RAYON_NUM_THREADS to limit it)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (counted in the summary) instead of stopping at the first")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own progress log")
    return p


class _Sentences:
    """Iterator over the non-empty lines of every document; remembers an error to re-raise.

    SentencePiece's C++ side calls this; an exception escaping into it would be reported as a
    generic training failure, so it is stored and re-raised after training stops.
    """

    def __init__(self, records):
        self._records = iter(records)
        self._lines = iter(())
        self.error: BaseException | None = None
        self.documents = 0
        self.sentences = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while True:
            for line in self._lines:
                line = line.strip()
                if line:
                    self.sentences += 1
                    return line
            try:
                texts = next(self._records)
            except StopIteration:
                raise
            except BaseException as e:  # noqa: BLE001 - re-raised by train()
                self.error = e
                raise StopIteration
            self.documents += 1
            self._lines = iter([ln for t in texts for ln in t.splitlines()])


def _sample(lines, size: int, seed: int):
    """All of ``lines`` if ``size <= 0``, else a uniform sample of ``size`` of them in their
    original order (reservoir sampling, algorithm R; memory: ``size`` lines)."""
    if size <= 0:
        return lines
    rng = random.Random(seed)
    reservoir = []  # (position, line)
    for n, line in enumerate(lines):
        if n < size:
            reservoir.append((n, line))
        else:
            j = rng.randrange(n + 1)
            if j < size:
                reservoir[j] = (n, line)
    reservoir.sort()
    return iter([line for _, line in reservoir])


def _set_model_prefix(model_file: str, prefix: str) -> None:
    """Record the final ``prefix`` in the model, not the random temporary one, so that the same
    input and seed give the same bytes. Needs protobuf; without it the model keeps the temporary
    prefix (the pieces are the same, only that field differs)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:
        return
    proto = model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = prefix
    with open(model_file, "wb") as f:
        f.write(proto.SerializeToString())


def _check_model_flags(args: argparse.Namespace) -> None:
    """Refuse the flags of the other kind of model; fill in SentencePiece's defaults."""
    if args.model_type == "wordpiece":
        given = [k for k in SENTENCEPIECE_ONLY if getattr(args, k) is not None]
        if given:
            raise MegaliteError(f"--{given[0].replace('_', '-')} is a SentencePiece setting "
                                f"(--model-type bpe or unigram), not for --model-type wordpiece")
        return
    if not args.lower_case or args.min_frequency:
        flag = "--no-lower-case" if not args.lower_case else "--min-frequency"
        raise MegaliteError(f"{flag} is for --model-type wordpiece (SentencePiece keeps case; "
                            f"see --normalization)")
    for key, default in SENTENCEPIECE_ONLY.items():
        if getattr(args, key) is None:
            setattr(args, key, default)


def _train_wordpiece(args: argparse.Namespace, files: list[str], t0: float) -> dict:
    passes: list[tuple[_Sentences, dict]] = []

    def checked(lines):
        """``lines``, then a stop for a bad line or an input without text (once per pass)."""
        yield from lines
        sentences = passes[-1][0]
        if sentences.error is not None:
            raise sentences.error
        if sentences.sentences == 0:
            raise MegaliteError(f"--input: no text found under --json-keys "
                                f"{' '.join(args.json_keys)}")

    def make_lines():
        skipped: dict = {}
        passes.append((_Sentences(iter_records(files, args.json_keys, args.skip_bad_lines,
                                               skipped)), skipped))
        return checked(_sample(passes[-1][0], args.input_sentence_size, args.seed))

    # a bad line or an input without text stops the pass that meets it (checked)
    tokens, _ = train_vocab(make_lines, args.vocab_size, args.lower_case, args.min_frequency)
    sentences, skipped = passes[-1]
    path = output_path(args.output_prefix)
    write_vocab(tokens, path)
    return {"documents": sentences.documents, "sentences": sentences.sentences,
            "skipped": skipped, "seconds": time.perf_counter() - t0, "outputs": [path],
            "vocab_size": len(tokens)}


def train(args: argparse.Namespace) -> dict:
    """Train and write the model; return a summary dict."""
    _check_model_flags(args)
    if args.model_type == "wordpiece":
        files = resolve_inputs(args.input)
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        return _train_wordpiece(args, files, time.perf_counter())
    import sentencepiece as spm

    if args.vocab_size < 8:
        raise MegaliteError(f"--vocab-size {args.vocab_size} is too small")
    if not 0.0 < args.character_coverage <= 1.0:
        raise MegaliteError(f"--character-coverage {args.character_coverage} is not in (0, 1]")
    files = resolve_inputs(args.input)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    skipped: dict = {}
    sentences = _Sentences(iter_records(files, args.json_keys, args.skip_bad_lines, skipped))
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=out_dir)
    tmp_prefix = os.path.join(tmp_dir, "model")
    t0 = time.perf_counter()
    try:
        spm.set_random_generator_seed(args.seed)
        corpus = _sample(sentences, args.input_sentence_size, args.seed)
        if sentences.error is not None:  # raised while sampling: no need to train first
            raise sentences.error
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=corpus, model_prefix=tmp_prefix, vocab_size=args.vocab_size,
                model_type=args.model_type, character_coverage=args.character_coverage,
                input_sentence_size=0, shuffle_input_sentence=False,
                max_sentence_length=args.max_sentence_length, byte_fallback=args.byte_fallback,
                normalization_rule_name=args.normalization, num_threads=args.num_threads,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
                minloglevel=0 if args.verbose else 1)
        except RuntimeError as e:
            if sentences.error is not None:
                raise sentences.error from None
            if sentences.sentences == 0:
                raise MegaliteError(f"--input: no text found under --json-keys "
                                    f"{' '.join(args.json_keys)}") from None
            hint = " (lower --vocab-size)" if "vocab" in str(e).lower() else ""
            raise MegaliteError(f"SentencePiece training failed: {str(e).strip()}{hint}") from None
        if sentences.error is not None:
            raise sentences.error
        if sentences.sentences == 0:
            raise MegaliteError(f"--input: no text found under --json-keys {' '.join(args.json_keys)}")
        _set_model_prefix(tmp_prefix + ".model", args.output_prefix)
        outputs = []
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, args.output_prefix + ext)
            outputs.append(args.output_prefix + ext)
    finally:
        for name in os.listdir(tmp_dir):
            os.unlink(os.path.join(tmp_dir, name))
        os.rmdir(tmp_dir)
    return {"documents": sentences.documents, "sentences": sentences.sentences,
            "skipped": skipped, "seconds": time.perf_counter() - t0, "outputs": outputs,
            "vocab_size": args.vocab_size}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    summary = train(args)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary["skipped"].items())) or "none"
    kind = "WordPiece vocabulary" if args.model_type == "wordpiece" else \
        f"{args.model_type} SentencePiece model"
    print(f"trained a {kind}, vocab {summary['vocab_size']}, on "
          f"{summary['documents']} documents ({summary['sentences']} lines) in "
          f"{summary['seconds']:.1f} s; skipped lines: {skipped}\n"
          f"wrote {' and '.join(summary['outputs'])}", file=sys.stderr)
    return 0
