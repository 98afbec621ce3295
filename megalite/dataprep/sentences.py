"""Sentence splitting for ``megalite preprocess --split-sentences`` (Megatron-LM's flag).

The splitter is ``sentencex`` (PyPI, MIT, rules for ~300 languages with fallbacks, nothing
downloaded at run time), pinned to :data:`SPLITTER_VERSION` because another version may cut
sentences elsewhere, which would change the output bytes. Why this one and not nupunkt, blingfire
or pysbd: README (Data preprocessing), figures from ``benchmarks/sentence_splitters.py``.

sentencex cuts a document's text into consecutive pieces, located in the text by
:meth:`SentenceSplitter.spans`; a piece of whitespace only (e.g. the blank line between
paragraphs) is no sentence. The whitespace between two sentences belongs to the
earlier one, whitespace before the first to the first. Then, like Megatron's NLTK splitter:

* default: each sentence is stripped of the whitespace around it (newlines inside it stay);
* ``--keep-newlines``: each sentence keeps the whitespace that follows it, newlines included, so
  the sentences joined give back the text without its trailing whitespace.

Sentences that tokenize to nothing are dropped by :func:`group_sentences` (Megatron's rule), see
there for the end-of-document id and documents left with no tokens at all.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from megalite.errors import MegaliteError

SPLITTER = "sentencex"
SPLITTER_VERSION = "1.0.32"

# Megatron's --lang takes NLTK Punkt model names; sentencex takes language codes.
NLTK_LANGUAGES = {
    "czech": "cs", "danish": "da", "dutch": "nl", "english": "en", "estonian": "et",
    "finnish": "fi", "french": "fr", "german": "de", "greek": "el", "italian": "it",
    "malayalam": "ml", "norwegian": "no", "polish": "pl", "portuguese": "pt", "russian": "ru",
    "slovene": "sl", "spanish": "es", "swedish": "sv", "turkish": "tr",
}
_CODE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{2,8})*")

# sentencex 1.0.32 panics (a Rust panic, which no `except Exception` catches) on a capital letter,
# one non-ASCII whitespace character and a period ("A\u00a0.", "B\u3000."): it slices bytes as if
# that whitespace were one byte. Boundaries are therefore found in a copy of the text with every
# non-ASCII whitespace character replaced by a space (same length in characters, so the cuts
# carry over to the real text unchanged); such whitespace then counts as a space everywhere.
NON_ASCII_SPACES = "\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # str.isspace()
_NON_ASCII_SPACE = re.compile(f"[{NON_ASCII_SPACES}]")


def language_code(lang: str | None) -> str:
    """The sentencex language code for ``--lang`` (a code such as ``en``/``zh``, or one of
    Megatron's NLTK names such as ``english``); None gives English."""
    if lang is None:
        return "en"
    code = NLTK_LANGUAGES.get(lang.lower(), lang.lower())
    if not _CODE.fullmatch(code):
        raise MegaliteError(f"--lang {lang}: not a language code (such as en, zh, de) nor one of "
                            f"Megatron's NLTK names ({', '.join(sorted(NLTK_LANGUAGES))})")
    return code


def load_segmenter():
    """``sentencex.segment``; a clear error naming the flag and the package when it is missing."""
    try:
        from sentencex import segment
    except ImportError as e:
        raise MegaliteError(f"--split-sentences needs the Python package {SPLITTER} ({e}); install "
                            f"it with: pip install {SPLITTER}=={SPLITTER_VERSION}") from None
    return segment


class SentenceSplitter:
    """``splitter(text) -> list[str]``: the sentences of one document, in order, none empty
    (an empty or all-whitespace text gives ``[]``)."""

    def __init__(self, lang: str | None = None, keep_newlines: bool = False):
        self.lang = language_code(lang)
        self.keep_newlines = keep_newlines
        self._segment = load_segmenter()

    def spans(self, text: str) -> list[tuple[int, int]]:
        """``(start, end)`` character offsets of the sentences, tiling ``text``: a sentence runs
        from its first non-whitespace character (the first one from the text's start) to the
        next one's, so the whitespace between two sentences belongs to the earlier.

        Each piece sentencex returns is looked up in the text rather than trusting the pieces to
        add up to it: sentencex 1.0.32 sometimes drops the blank line between two paragraphs.
        Anything else missing or changed raises ``RuntimeError``."""
        probe = text if text.isascii() else _NON_ASCII_SPACE.sub(" ", text)
        starts, pos = [], 0
        for piece in self._segment(self.lang, probe):
            core = piece.strip()
            if not core:  # a blank line between paragraphs is no sentence
                continue
            at = probe.find(core, pos)
            if at < 0 or (at > pos and not probe[pos:at].isspace()):
                raise RuntimeError(f"{SPLITTER} returned a sentence that is not the next part of "
                                   f"the text: {core[:60]!r}")
            starts.append(at)
            pos = at + len(core)
        if probe[pos:].strip():
            raise RuntimeError(f"{SPLITTER} left out the end of the text: {probe[pos:pos + 60]!r}")
        if not starts:
            return []
        starts[0] = 0
        return list(zip(starts, starts[1:] + [len(text)]))

    def __call__(self, text: str) -> list[str]:
        spans = self.spans(text)
        if not self.keep_newlines:
            return [text[a:b].strip() for a, b in spans]
        out = [text[a:b] for a, b in spans]
        if out:
            out[-1] = out[-1].rstrip()
        return out


SPLITTER_FAILED = "sentence splitter failed"  # a bad-line reason, counted like the others


def split_values(splitter: SentenceSplitter, keys: Sequence[str], values: Sequence[str]):
    """``(sentences per key, None)`` for one line's texts, or ``(None, (reason, message))`` when
    the splitter fails on one (a Rust panic in sentencex is a BaseException: only the stopping
    ones are let through)."""
    out = []
    for key, text in zip(keys, values):
        try:
            out.append(splitter(text))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 - see the docstring
            return None, (SPLITTER_FAILED, f"value of {key!r}: the sentence splitter ({SPLITTER}) "
                                           f"failed: {type(e).__name__}: {e}")
    return out, None


def group_sentences(ids: Sequence[list[int]], counts: Sequence[int], eod: int | None):
    """Documents from their sentences' token ids, as Megatron-LM's ``preprocess_data.py`` builds
    them: a sentence of no tokens is dropped; ``eod`` (None: no ``--append-eod``) is appended to a
    document's last sentence, and only when the document has a token; a document of no tokens is
    kept as a document of no sentences.

    ``ids``: token ids per sentence, all documents in order; ``counts``: sentences per document.
    Returns ``(tokens, sentence_lengths, sentences_per_document)``: flat ids (list), int64
    ``[kept sentences]`` and int64 ``[documents]``.
    """
    tokens, lengths, per_doc = [], [], np.zeros(len(counts), dtype=np.int64)
    i = 0
    for d, count in enumerate(counts):
        kept = 0
        for sentence in ids[i:i + count]:
            if sentence:
                tokens.extend(sentence)
                lengths.append(len(sentence))
                kept += 1
        i += count
        if kept and eod is not None:
            tokens.append(eod)
            lengths[-1] += 1
        per_doc[d] = kept
    return tokens, np.asarray(lengths, dtype=np.int64), per_doc


def check_newlines_survive(tokenizer, tokenizer_type: str) -> None:
    """Refuse ``--keep-newlines`` with a tokenizer that drops trailing newlines (SentencePiece's
    default normalizer, BERT's): the flag would change nothing, silently."""
    if tokenizer.encode("a\n\n") == tokenizer.encode("a"):
        raise MegaliteError(f"--keep-newlines: the {tokenizer_type} tokenizer drops newlines (it "
                            f"encodes 'a\\n\\n' as it encodes 'a'), so the kept newlines would not "
                            f"reach the token files; leave --keep-newlines out")


def add_sentence_documents(builder, tokens: np.ndarray, sentence_lengths: np.ndarray,
                           per_document: np.ndarray) -> None:
    """Appends documents of several sentences to an ``IndexedDatasetBuilder``. ``tokens``: 1-D, the
    documents back to back; ``sentence_lengths``: int64 ``[sentences]``; ``per_document``: int64
    ``[documents]``, how many of those sentences each document has (0: a document of no tokens)."""
    ends = np.cumsum(per_document)
    token_ends = np.concatenate(([0], np.cumsum(sentence_lengths)))
    first = 0
    for last in ends.tolist():
        lo, hi = int(token_ends[first]), int(token_ends[last])
        builder.add_document(tokens[lo:hi], sentence_lengths[first:last])
        first = last
