"""Packed GPT samples with document boundaries: Megatron-LM's ``--reset-position-ids``,
``--reset-attention-mask`` and ``--eod-mask-loss`` (YAML ``data.reset_position_ids``,
``data.reset_attention_mask``, ``data.eod_mask_loss``) for a run.

A GPT sample is ``seq_length + 1`` tokens cut across documents, which end at the tokenizer's
end-of-document (eod) id. With any of the flags, a run's microbatches carry, besides ``tokens``
and ``labels`` [b, s], the per-token fields of :func:`megalite.model.doc_attention.document_fields`
computed from the input tokens: ``position_ids``, ``doc_ids``, ``loss_mask`` (int64 [b, s]).
BERT and T5 samples are not packed documents: the flags are refused for them.
"""
from __future__ import annotations

import functools
from typing import Callable

from megalite.data.batches import gpt_microbatch
from megalite.data.tokenizers import build_tokenizer
from megalite.errors import ConfigError
from megalite.model.doc_attention import document_fields

__all__ = ["DOCUMENT_FLAGS", "document_flags", "run_eod_id", "packed_gpt_collate",
           "check_gpt_document_flags", "refuse_document_flags"]

DOCUMENT_FLAGS = (("reset_position_ids", "--reset-position-ids"),
                  ("reset_attention_mask", "--reset-attention-mask"),
                  ("eod_mask_loss", "--eod-mask-loss"))
"""(DataConfig field, Megatron-LM flag) of each document setting."""


def document_flags(data) -> dict[str, bool]:
    """The document settings of a run's DataConfig, by field."""
    return {name: bool(getattr(data, name)) for name, _ in DOCUMENT_FLAGS}


def _first_set(data) -> tuple[str, str] | None:
    return next(((n, f) for n, f in DOCUMENT_FLAGS if getattr(data, n)), None)


def run_eod_id(config) -> int:
    """The end-of-document id of a run's tokenizer (``config``: its TrainConfig); with
    NullTokenizer the id after ``--vocab-size`` (the model's last id)."""
    data = config.data
    if data.tokenizer_type == "NullTokenizer":
        return config.model.vocab_size - 1
    return build_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_file,
                           data.merge_file).eod


def _packed_microbatch(samples: list, *, eod: int, flags: dict[str, bool]) -> dict:
    batch = gpt_microbatch(samples)
    batch.update(document_fields(batch["tokens"], eod, **flags))
    return batch


def packed_gpt_collate(config) -> Callable[[list], dict]:
    """GPT's collate for a run: :func:`~megalite.data.batches.gpt_microbatch`, plus the
    document fields when a document flag is set."""
    flags = document_flags(config.data)
    if not any(flags.values()):
        return gpt_microbatch
    return functools.partial(_packed_microbatch, eod=run_eod_id(config), flags=flags)


def check_gpt_document_flags(config) -> None:
    """Start-up check: the document flags need the tokenizer's eod id (ConfigError)."""
    first = _first_set(config.data)
    if first is not None and config.data.tokenizer_type is None:
        raise ConfigError(f"{first[1]} needs the end-of-document id of the tokenizer: give "
                          f"--tokenizer-type (with --mock-data e.g. --tokenizer-type "
                          f"NullTokenizer --vocab-size N, whose eod id is N)", "data", first[0])


def refuse_document_flags(config, family: str) -> None:
    """Start-up check of the families whose samples are not packed documents (BERT, T5)."""
    first = _first_set(config.data)
    if first is not None:
        raise ConfigError(f"{first[1]} is for GPT's packed samples; --model-type {family} "
                          f"samples are not packed documents (leave the flag out)", "data",
                          first[0])
