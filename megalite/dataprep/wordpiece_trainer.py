"""``megalite train-tokenizer --model-type wordpiece``: a BERT WordPiece ``vocab.txt``.

Trained with Hugging Face ``tokenizers``' ``WordPieceTrainer`` behind the normalizer and
pre-tokenizer of megalite's ``BertWordPieceLowerCase`` / ``BertWordPieceCase`` tokenizers
(:class:`megalite.data.tokenizers.BertWordPieceTokenizer`): BERT's clean-up, CJK characters
split apart, punctuation split, lower-casing and accent stripping unless ``--no-lower-case``;
``##`` marks a word's continuation pieces. The vocabulary starts with ``[PAD] [UNK] [CLS] [SEP]
[MASK]`` (ids 0-4, as in Google's BERT vocabularies: [PAD] 0 is the padding id the BERT/T5 data
assume), then the characters, the ``##`` characters and the learned pieces in the order they
were learned. Same input, same file (:func:`train_vocab` says how, tokenizers' own trainer does
not promise it); the text is read twice.

Output: ``PREFIX.vocab.txt``, one token per line in id order, written under a temporary name in
the same directory and renamed into place. Use it with ``--tokenizer-type BertWordPieceLowerCase
--vocab-file PREFIX.vocab.txt`` (``BertWordPieceCase`` for a ``--no-lower-case`` vocabulary).
"""
from __future__ import annotations

from megalite.atomic_text import atomic_text_file
from megalite.data.tokenizers import bert_wordpiece_pipeline
from megalite.errors import MegaliteError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# train-tokenizer flags that only SentencePiece reads (name -> the default they take there)
SENTENCEPIECE_ONLY = {"character_coverage": 0.9995, "max_sentence_length": 8192,
                      "byte_fallback": False, "normalization": "nmt_nfkc"}


def output_path(prefix: str) -> str:
    """Where the vocabulary of ``--output-prefix prefix`` goes."""
    return prefix + ".vocab.txt"


def _symbols(lines, lower_case: bool) -> tuple[list[str], list[str]]:
    """The characters of the text after BERT's normalizer and pre-tokenizer, and the
    ``##``-prefixed ones that continue a word, each sorted by code point (the trainer's own
    first step, with no merge)."""
    from tokenizers import trainers

    tok = bert_wordpiece_pipeline(None, lower_case)
    trainer = trainers.WordPieceTrainer(vocab_size=len(SPECIAL_TOKENS) + 1, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(lines, trainer=trainer)
    vocab = set(tok.get_vocab(with_added_tokens=True)) - set(SPECIAL_TOKENS)
    return (sorted(t for t in vocab if len(t) == 1),
            sorted(t for t in vocab if len(t) == 3 and t.startswith("##")))


def train_vocab(make_lines, vocab_size: int, lower_case: bool, min_frequency: int = 0):
    """Train on the text ``make_lines()`` gives (a fresh iterator of str each call; read twice).

    Returns ``(tokens, tokenizer)``: the tokens in id order (at most ``vocab_size``, fewer when
    the text has fewer pieces) and the trained ``tokenizers.Tokenizer`` (its WordPiece model
    holds the same tokens and ids; the characters are also its added tokens, see below).

    ``tokenizers``' trainer breaks ties between equally frequent merges by the ids of the
    pieces, and it numbers the ``##x`` continuation characters in hash-map order, which
    changes from run to run: the vocabulary (its order and, at ties, a few of its pieces)
    would differ between two runs on the same text. A first pass finds the characters; they
    are then given to the trainer after the five special tokens, in code-point order (the
    characters, then the ``##`` ones, where the trainer puts them itself), so every id and every
    tie is fixed.
    """
    from tokenizers import trainers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise MegaliteError(f"--vocab-size {vocab_size} is too small for a WordPiece "
                            f"vocabulary (the {len(SPECIAL_TOKENS)} special tokens and more)")
    chars, continuations = _symbols(make_lines(), lower_case)
    least = len(SPECIAL_TOKENS) + len(chars) + len(continuations)
    if vocab_size < least:  # the trainer would keep them all and exceed the size
        raise MegaliteError(f"--vocab-size {vocab_size} is smaller than the {least} special "
                            f"tokens and characters of the text; raise it")
    tok = bert_wordpiece_pipeline(None, lower_case)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[*SPECIAL_TOKENS, *chars, *continuations], continuing_subword_prefix="##")
    tok.train_from_iterator(make_lines(), trainer=trainer)
    by_id = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    # never seen; checked because a vocab.txt cannot express a gap or another order
    if [i for _, i in by_id] != list(range(len(by_id))) or \
            tuple(t for t, _ in by_id[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise MegaliteError("WordPiece training gave non-contiguous ids or moved the specials")
    return [token for token, _ in by_id], tok


def write_vocab(tokens: list[str], path: str) -> None:
    """``tokens`` one a line to ``path``, through a temporary name in the same directory."""
    with atomic_text_file(path, prefix=".tmp-vocab-") as f:
        f.writelines(f"{token}\n" for token in tokens)
