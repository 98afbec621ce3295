"""The special ids ``megalite generate`` needs for an encoder-decoder (T5) checkpoint, and the
text of what it generated.

* start: the decoder's first input, ``decoder_start_token_id`` of the model config when set
  (Hugging Face T5: 0, its pad); else, for a WordPiece tokenizer, the ``[BOS]`` of its
  masked-LM vocabulary (:func:`megalite.data.masked_dataset.masked_lm_vocab` with the run's
  ``--vocab-extra-ids``), which megalite's T5 data starts the decoder with.
* stop: the ``[EOS]`` of that vocabulary (the T5 data's last label), else the tokenizer's
  end-of-document id (``</s>`` for T5's SentencePiece model).
* choices: every id of the model's vocabulary (as transformers' ``generate`` does): sentinels
  and the appended [BOS]/[EOS] lie past a WordPiece tokenizer's ids, and T5's sentinels past its
  SentencePiece model's. In the text, ids the tokenizer cannot decode are written by name
  (``<extra_id_3>``, ``[BOS]``), or ``<id N>`` when the name is unknown.
* prompt: those names in the prompt text are the ids they name (:func:`encode_prompt`), so a
  prompt can hold sentinels, as the T5 data's encoder inputs do: ``"the os module
  <extra_id_0> files"`` asks the model to fill span 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from megalite.errors import MegaliteError

__all__ = ["Seq2SeqIds", "encode_prompt", "seq2seq_ids", "seq2seq_text"]


@dataclass
class Seq2SeqIds:
    start: int
    """The decoder's first input id."""
    stop: int
    """Generation of a row ends at this id."""
    names: dict[int, str] = field(default_factory=dict)
    """Names of ids past the tokenizer's vocabulary."""
    pad: int | None = None
    """The padding id of the data (WordPiece: [PAD]), when known."""


def _vocab_extra_ids(train_config) -> int:
    data = getattr(train_config, "data", None)
    if data is None and isinstance(train_config, dict):
        data = train_config.get("data") or {}
    value = data.get("vocab_extra_ids") if isinstance(data, dict) else getattr(
        data, "vocab_extra_ids", None)
    return int(value or 0)


def seq2seq_ids(tokenizer, config, train_config) -> Seq2SeqIds:
    """The start and stop ids and the names (module doc) for ``tokenizer`` and the model
    ``config`` (a TransformerConfig) of a checkpoint whose config.json is ``train_config``."""
    from megalite.data.tokenizers import BertWordPieceTokenizer
    start = config.decoder_start_token_id
    if isinstance(tokenizer, BertWordPieceTokenizer):
        from megalite.data.masked_dataset import masked_lm_vocab
        vocab = masked_lm_vocab(tokenizer, _vocab_extra_ids(train_config))
        names = {vocab.bos: "[BOS]", vocab.eos: "[EOS]"}
        names.update({s: f"<extra_id_{k}>" for k, s in enumerate(vocab.sentinels)})
        ids = Seq2SeqIds(vocab.bos if start is None else start, vocab.eos, names, vocab.pad)
    elif start is None:
        raise MegaliteError(f"the checkpoint's model config names no decoder_start_token_id and "
                            f"its tokenizer ({tokenizer.source}) is not a WordPiece vocabulary "
                            f"with a [BOS]; set model.decoder_start_token_id")
    else:
        ids = Seq2SeqIds(start, tokenizer.eod)
    for what, value in (("decoder start", ids.start), ("stop", ids.stop)):
        if not 0 <= value < config.vocab_size:
            raise MegaliteError(f"the {what} id {value} is outside the model's vocabulary "
                                f"[0, {config.vocab_size})")
    return ids


def seq2seq_text(tokenizer, new_ids: list[int], ids: Seq2SeqIds) -> str:
    """The generated ids (without the stop id) as text: runs of ids the tokenizer knows are
    decoded together; the others are written by name."""
    pieces, run = [], []
    for i in new_ids:
        if i < tokenizer.vocab_size:
            run.append(i)
            continue
        if run:
            pieces.append(tokenizer.decode(run))
            run = []
        pieces.append(ids.names.get(i, f"<id {i}>"))
    if run:
        pieces.append(tokenizer.decode(run))
    return " ".join(p for p in pieces if p)


def encode_prompt(tokenizer, text: str, ids: Seq2SeqIds) -> list[int]:
    """The encoder input of ``text``: each name of ``ids.names`` (``<extra_id_0>``, ...) in it
    is the id it names, the text between them is tokenized piece by piece."""
    if not ids.names:
        return tokenizer.encode(text)
    by_name = {name: i for i, name in ids.names.items()}
    pattern = "|".join(re.escape(n) for n in sorted(by_name, key=len, reverse=True))
    out, start = [], 0
    for match in re.finditer(pattern, text):
        out += tokenizer.encode(text[start:match.start()]) if match.start() > start else []
        out.append(by_name[match.group()])
        start = match.end()
    return out + (tokenizer.encode(text[start:]) if start < len(text) else [])
