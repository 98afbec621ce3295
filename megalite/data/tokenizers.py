"""Tokenizers behind one small interface, selected by Megatron-LM's ``--tokenizer-type`` names.

=========================  ===========================  ==========================================
``--tokenizer-type``       file flag                    library, end-of-document id (``eod``)
=========================  ===========================  ==========================================
SentencePieceTokenizer     ``--tokenizer-model M.model``  sentencepiece; the model's eos (``</s>``)
BertWordPieceLowerCase     ``--vocab-file vocab.txt``   tokenizers WordPiece (lower-cased); ``[SEP]``
BertWordPieceCase          ``--vocab-file vocab.txt``   tokenizers WordPiece (cased); ``[SEP]``
HuggingFaceTokenizer       ``--tokenizer-model tokenizer.json`` (or its directory)
                                                        tokenizers; eos from ``tokenizer_config.json``
                                                        next to it, else ``</s>``/``<|endoftext|>``/...
GPT2BPETokenizer           ``--vocab-file vocab.json``  tokenizers byte-level BPE (GPT-2's rules);
                           ``--merge-file merges.txt``  ``<|endoftext|>``
NullTokenizer              ``--vocab-size N``           none: text is ids written as decimal
                                                        numbers ("5 17 3"); ``eod`` = N, so the
                                                        vocabulary has N + 1 ids (Megatron-LM's)
=========================  ===========================  ==========================================

``encode`` never adds special tokens (no BOS, no [CLS]/[SEP]): a pretraining document is its
text's ids, and the document boundary is the ``eod`` id that ``preprocess --append-eod`` appends.

Data text never becomes a control id: a literal ``</s>``, ``[SEP]`` or ``<|endoftext|>`` in a
document is encoded as the characters it is made of, so a document can never end (or start)
itself early. SentencePiece never matches its control pieces (``<s>``, ``</s>``, ``<pad>``) in
text, nor ``<unk>``; its *user-defined* symbols do match text, by SentencePiece's definition, and
are ordinary vocabulary here (``megalite train-tokenizer`` makes none). WordPiece and GPT-2 BPE
split ``[``/``<``/``|`` off before the vocabulary lookup, so ``[SEP]`` and ``<|endoftext|>`` can
only come from their ids. For a ``tokenizer.json`` the ``tokenizers`` library would match every
added token in text; megalite turns that off for special ones (``encode_special_tokens``) and
counts as special the eod and the ``*_token`` entries of ``tokenizer_config.json`` too. The
``tokenizers``-based ones check at load time that the text of each control token does not encode
to a control id and refuse the file otherwise. ``decode`` is unaffected: ids, control ones
included, decode to their text.

``encode_batch`` runs on the calling thread only: the preprocessing tool gets its parallelism
from worker processes, and a tokenizer that starts its own threads would oversubscribe the cores
(for the ``tokenizers`` library set ``TOKENIZERS_PARALLELISM=false`` in such processes).
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import Sequence

from megalite.errors import MegaliteError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "BertWordPieceLowerCase", "BertWordPieceCase",
                   "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer")

# End-of-document candidates for a bare tokenizer.json, most common first.
_HF_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


class Tokenizer(ABC):
    """Text <-> token ids. ``vocab_size`` bounds every id; ``eod`` ends a document.

    ``source`` names the tokenizer in messages (its type and file); ``control_ids`` are the ids
    that data text never encodes to (eod, bos, pad, cls, sep, mask and other special tokens;
    ``unk`` is not among them: it stands for text the vocabulary cannot represent).
    """

    vocab_size: int
    eod: int
    source: str
    control_ids: frozenset

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, possibly faster; single-threaded."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens kept)."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (e.g. one written by ``megalite train-tokenizer``)."""

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(model_file)
        except (OSError, RuntimeError) as e:
            raise MegaliteError(f"--tokenizer-model {model_file}: not a SentencePiece model ({e})")
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        self.source = f"--tokenizer-model {model_file}"
        if self.eod < 0:
            raise MegaliteError(f"--tokenizer-model {model_file}: the model has no end-of-sentence "
                                f"piece (eos_id is -1); retrain it with an eos, e.g. with "
                                f"`megalite train-tokenizer`")
        # SentencePiece takes only CONTROL pieces as eos/bos/pad (an id of -1 otherwise), and
        # never matches a CONTROL piece in text: no check needed.
        self.control_ids = frozenset(i for i in (self.eod, self._sp.bos_id(), self._sp.pad_id())
                                     if i >= 0)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class _HFTokenizersTokenizer(Tokenizer):
    """Shared code for tokenizers built on the Hugging Face ``tokenizers`` library."""

    _tok = None  # a tokenizers.Tokenizer, set by the subclass

    def _seal_controls(self, names=(), unk: str | None = None) -> None:
        """Make text never match a control token: the added tokens named in ``names`` (token
        texts: eod, tokenizer_config's specials) become special, special added tokens are then
        encoded as plain text, and every control token's text is checked (see the module doc).
        ``unk``: the unknown token's text if known otherwise (tokenizer_config's unk_token).
        Sets ``control_ids``; ``eod`` and ``source`` must be set."""
        from tokenizers import AddedToken

        added = self._tok.get_added_tokens_decoder()           # id -> AddedToken
        names = set(names) | {self._tok.id_to_token(self.eod)}
        reseal = [t for t in added.values() if t.content in names and not t.special]
        if reseal:  # re-adding an existing token keeps its id and updates its flags
            self._tok.add_special_tokens([
                AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip,
                           rstrip=t.rstrip, normalized=t.normalized, special=True)
                for t in reseal])
            added = self._tok.get_added_tokens_decoder()
        try:
            self._tok.encode_special_tokens = True
        except AttributeError:
            raise MegaliteError(f"{self.source}: the installed tokenizers library is too old to "
                                f"keep special-token text as text; pip install -U tokenizers") from None
        controls = {t.content: i for i, t in added.items() if t.special}
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                controls[name] = token_id
        # Unrepresentable text legitimately encodes to unk (unless unk doubles as, say, eos).
        for token in {unk, _model_unk_token(self._tok)} - names:
            controls.pop(token, None)
        self.control_ids = frozenset(controls.values())
        self._refuse_forgeable_controls(controls)

    def _refuse_forgeable_controls(self, controls: dict) -> None:
        """Raise if the text of a control token ({text: id}) encodes to any control id, i.e.
        if data text could forge a document boundary or another control token."""
        for text, token_id in sorted(controls.items(), key=lambda kv: kv[1]):
            forged = sorted(set(self.encode(text)) & self.control_ids)
            if forged:
                raise MegaliteError(f"{self.source}: the text {text!r} (control token {token_id}) "
                                    f"encodes to control id(s) {forged}, so a document containing "
                                    f"it would hold control tokens; this tokenizer is not usable "
                                    f"for pretraining data")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def bert_wordpiece_pipeline(vocab: dict | None, lower_case: bool):
    """A ``tokenizers.Tokenizer``: WordPiece over ``vocab`` (token -> id; None: empty, for
    training) behind BERT's normalizer and pre-tokenizer (what :class:`BertWordPieceTokenizer`
    runs, and what ``train-tokenizer --model-type wordpiece`` trains behind)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab or {}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


class BertWordPieceTokenizer(_HFTokenizersTokenizer):
    """BERT WordPiece from a ``vocab.txt`` (one token per line), cased or lower-cased.

    BERT's basic tokenisation (clean-up, CJK characters split apart, punctuation split, accents
    stripped when lower-casing) then greedy longest-match WordPiece with ``##`` continuations.
    """

    def __init__(self, vocab_file: str, lower_case: bool):
        from tokenizers import decoders, models

        try:
            vocab = models.WordPiece.read_file(vocab_file)
        except Exception as e:  # the Rust side raises a plain Exception on I/O or format errors
            raise MegaliteError(f"--vocab-file {vocab_file}: cannot read the WordPiece vocab ({e})")
        for special in ("[UNK]", "[SEP]"):
            if special not in vocab:
                raise MegaliteError(f"--vocab-file {vocab_file}: no {special} token in the vocab")
        tok = bert_wordpiece_pipeline(vocab, lower_case)
        tok.decoder = decoders.WordPiece(prefix="##")
        self._tok = tok
        self.vocab_file = vocab_file
        self.lower_case = lower_case
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eod = vocab["[SEP]"]
        self.source = f"--vocab-file {vocab_file}"
        self._seal_controls(t for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if t in vocab)


class HuggingFaceTokenizer(_HFTokenizersTokenizer):
    """A ``tokenizer.json`` (a file, or a directory that holds one) loaded with ``tokenizers``.

    ``eod``: the ``eos_token`` of a ``tokenizer_config.json`` in the same directory if there is
    one, else the first of ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``... found
    in the vocabulary.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise MegaliteError(f"--tokenizer-model {path}: no tokenizer.json there")
        try:
            self._tok = HFTokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a plain Exception for bad JSON
            raise MegaliteError(f"--tokenizer-model {file}: not a tokenizers JSON file ({e})")
        self.tokenizer_file = file
        self.source = f"--tokenizer-model {file}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        specials = _configured_specials(os.path.join(os.path.dirname(file), "tokenizer_config.json"))
        eos = specials.get("eos_token")
        candidates = (eos,) if eos else _HF_EOS_CANDIDATES
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                self.eod = token_id
                break
        else:
            raise MegaliteError(f"--tokenizer-model {file}: no end-of-document token; looked for "
                                f"{', '.join(candidates)}")
        self._seal_controls([t for k, t in specials.items() if k != "unk_token"],
                            unk=specials.get("unk_token"))


class GPT2BPETokenizer(_HFTokenizersTokenizer):
    """GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt``; ``eod`` is ``<|endoftext|>``."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # the Rust side raises a plain Exception on I/O or format errors
            raise MegaliteError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: cannot read "
                                f"GPT-2 BPE files ({e})")
        tok = HFTokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex split
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eod = tok.token_to_id("<|endoftext|>")
        if eod is None:
            raise MegaliteError(f"--vocab-file {vocab_file}: no <|endoftext|> token in the vocab")
        self.eod = eod
        self.source = f"--vocab-file {vocab_file}"
        self._seal_controls()


class NullTokenizer(Tokenizer):
    """Megatron-LM's NullTokenizer: for data that is already ids. ``encode("5 17 3")`` is
    ``[5, 17, 3]`` (each id below ``vocab_size``); ``eod`` is ``vocab_size``, so the
    vocabulary has ``vocab_size + 1`` ids."""

    def __init__(self, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise MegaliteError(f"--tokenizer-type NullTokenizer needs --vocab-size N >= 1, got "
                                f"{vocab_size!r}")
        self.eod = vocab_size
        self.vocab_size = vocab_size + 1
        self.source = f"NullTokenizer --vocab-size {vocab_size}"
        self.control_ids = frozenset({self.eod})

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise MegaliteError(f"{self.source}: the text must be ids written as decimal "
                                f"numbers, got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < self.eod]
        if bad:
            raise MegaliteError(f"{self.source}: id {bad[0]} is not in [0, {self.eod})")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def _model_unk_token(tok) -> str | None:
    """The unknown token's text of a tokenizers.Tokenizer's model (BPE, WordPiece, WordLevel
    name it; Unigram has only an id, in its serialized state)."""
    model = tok.model
    if hasattr(model, "unk_token"):
        return model.unk_token or None
    try:
        unk_id = json.loads(model.__getstate__()).get("unk_id")
    except (AttributeError, TypeError, ValueError):
        return None
    return tok.id_to_token(unk_id) if isinstance(unk_id, int) else None


_CONFIG_SPECIALS = ("eos_token", "bos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                    "mask_token")


def _configured_specials(config_file: str) -> dict:
    """The special tokens of a transformers ``tokenizer_config.json``: {key: text} for the
    ``*_token`` keys (a string or an AddedToken dict) and ``additional_special_tokens`` (as
    ``additional_special_tokens.N``); {} without the file."""
    if not os.path.isfile(config_file):
        return {}
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        extra = config.get("additional_special_tokens") or []
        entries = [(k, config.get(k)) for k in _CONFIG_SPECIALS]
        entries += [(f"additional_special_tokens.{n}", t) for n, t in enumerate(extra)]
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise MegaliteError(f"{config_file}: cannot read the special tokens ({e})")
    specials = {}
    for key, token in entries:
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token:
            specials[key] = token
    return specials


def _require_file(flag: str, path: str | None, tokenizer_type: str, directory_ok=False) -> str:
    if not path:
        raise MegaliteError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not (os.path.isfile(path) or (directory_ok and os.path.isdir(path))):
        raise MegaliteError(f"{flag} {path}: no such file")
    return path


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None,
                    vocab_file: str | None = None, merge_file: str | None = None,
                    vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer named by ``tokenizer_type`` (one of :data:`TOKENIZER_TYPES`).

    Raises :class:`MegaliteError` naming the flag for an unknown type, a missing file, or a file
    flag the type does not use (``--vocab-file`` for a model-file type and vice versa).
    ``merge_file`` is GPT-2's ``merges.txt`` (``--merge-file``), for ``GPT2BPETokenizer`` only;
    ``vocab_size`` (``--vocab-size``) is for ``NullTokenizer`` only.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise MegaliteError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
                            f"{', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "NullTokenizer":
        if tokenizer_model or vocab_file or merge_file:
            raise MegaliteError("--tokenizer-type NullTokenizer reads no files (it needs "
                                "--vocab-size only)")
        return NullTokenizer(vocab_size)
    if tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        if vocab_file or merge_file:
            flag = "--vocab-file" if vocab_file else "--merge-file"
            raise MegaliteError(f"{flag} is not used by --tokenizer-type {tokenizer_type}; "
                                f"pass the model with --tokenizer-model")
        if tokenizer_type == "SentencePieceTokenizer":
            return SentencePieceTokenizer(
                _require_file("--tokenizer-model", tokenizer_model, tokenizer_type))
        return HuggingFaceTokenizer(
            _require_file("--tokenizer-model", tokenizer_model, tokenizer_type, directory_ok=True))
    if tokenizer_model:
        raise MegaliteError(f"--tokenizer-model is not used by --tokenizer-type {tokenizer_type}; "
                            f"pass the vocab with --vocab-file")
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(_require_file("--vocab-file", vocab_file, tokenizer_type),
                                _require_file("--merge-file", merge_file, tokenizer_type))
    if merge_file:
        raise MegaliteError("--merge-file is only used by --tokenizer-type GPT2BPETokenizer")
    return BertWordPieceTokenizer(_require_file("--vocab-file", vocab_file, tokenizer_type),
                                  lower_case=tokenizer_type == "BertWordPieceLowerCase")
