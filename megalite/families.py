"""Model families: what differs between GPT, BERT and T5 pretraining, one entry per family.

``TransformerConfig.model_type`` (``megalite train --model-type``, YAML ``model.model_type``)
names the family; everything else in megalite (the layout and its parallel layers, the pipeline
schedule, the optimizer and gradient sync, checkpoints by parameter name, resharding) is shared.
What a family brings, and who calls it:

====================================  =======================================================
field                                 used by
====================================  =======================================================
``model_class``                       ``parallel.pipeline.stages.build_model_chunks``: one
                                      chunk per (virtual) pipeline stage
``loss_class``                        the trainer: the loss object of each step (training/
                                      loss.py), called by the schedule on the last stage
``collate``                           ``data.batches``: dataset items -> one microbatch dict
``run_collate``                       the trainer: a run's collate when its settings change
                                      it (GPT's packed-document fields)
``build_datasets``                    the trainer: (train, valid, test) datasets of a run
``tokenizer_vocab_size``              the run preparation: the model's vocabulary size
``forward_flops_per_token``           metrics (TFLOP/s, MFU): :meth:`flops_per_iteration`
``activation_bytes_per_layer``        ``--dry-run``'s memory estimate
``hf_converter``                      ``megalite convert``: the Hugging Face name maps
``check_run``                         the run preparation: the family's start-up checks
``stage_fields``                      the trainer: the microbatch fields a pipeline stage
                                      reads (only those are loaded and copied to the device)
====================================  =======================================================

A family that cannot run yet has ``unavailable`` set: :func:`family_of` refuses it with that
reason (one line, naming the flag) wherever a run, a plan or a conversion asks for it.

The interface of a model chunk (``model_class(config, ctx, *, pre_process, post_process,
layer_range)``): ``forward_microbatch(hidden, microbatch)`` runs one microbatch (``hidden`` is
the previous stage's activations, None on the first stage) and returns the activations for
the next stage or, on the last stage, what ``loss_class`` takes; plus ``init_weights(seed)``,
``full_state_dict()``, ``load_full_state_dict()``, ``to_empty()``, ``config`` and
``layer_range`` (see :class:`megalite.model.gpt.GPTModel`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from megalite.convert import hf_bert, hf_models, hf_t5
from megalite.data.batches import gpt_microbatch, stacked_microbatch
from megalite.data.documents import (check_gpt_document_flags, document_flags,
                                     packed_gpt_collate, refuse_document_flags)
from megalite.data.masked_dataset import masked_lm_vocab
from megalite.data.per_split import bert_datasets, gpt_datasets, t5_datasets
from megalite.errors import ConfigError, MegaliteError
from megalite.model.bert import BertModel
from megalite.model.config import MODEL_TYPES, TransformerConfig
from megalite.model.encoder_decoder import EncoderDecoderModel
from megalite.model.flops import (bert_forward_flops_per_token, flops_per_iteration,
                                  gpt_forward_flops_per_token, t5_forward_flops_per_token)
from megalite.model.gpt import GPTModel
from megalite.model.memory import activation_bytes_per_layer, encoder_decoder_activation_bytes
from megalite.training.loss import BERTLoss, GPTLoss, T5Loss

__all__ = ["ModelFamily", "FAMILIES", "family_of"]


@dataclass(frozen=True)
class ModelFamily:
    """What one model family brings (see the module docstring)."""

    name: str
    """``model_type``: "gpt", "bert" or "t5"."""
    description: str
    """One line for messages and the start-up banner."""
    model_class: type | None = None
    """The model chunk class (module docstring)."""
    loss_class: type | None = None
    """``loss_class(num_microbatches, loss_scale)``: the step's loss object, a
    :class:`~megalite.parallel.pipeline.schedules.MicrobatchLoss` with ``global_mean``."""
    collate: Callable[[list], dict] | None = None
    """Dataset items of one microbatch -> ``{field: int64 tensor [b, ...]}``."""
    build_datasets: Callable[..., tuple] | None = None
    """``build_datasets(config, num_samples, seq_length, seed)`` -> (train, valid, test), None
    for a split without samples; ``config`` is the run's TrainConfig."""
    tokenizer_vocab_size: Callable[[Any, Any], int] | None = None
    """``(tokenizer, data config) -> int``: the ids the model's vocabulary must hold for data
    of that tokenizer (the run's :class:`~megalite.config.DataConfig`)."""
    forward_flops_per_token: Callable[[TransformerConfig, int], float] | None = None
    """``(model config, seq_length) -> float``: forward GEMM FLOPs of one token."""
    activation_bytes_per_layer: Callable[..., float] | None = None
    """``(TrainConfig, tp, device=None) -> float``: activation bytes of one layer for one
    microbatch; ``device`` ("cpu"/"cuda", None: this process's) decides whether the attention
    scores are kept (:mod:`megalite.model.memory`)."""
    hf_converter: Any = None
    """The Hugging Face converter: a module with ``param_mappings``, ``to_hf``, ``from_hf``,
    ``config_to_hf``, ``config_from_hf`` (:mod:`megalite.convert.hf_models` for GPT)."""
    vocab_note: str = ""
    """What the tokenizer's vocabulary size means for this family (for messages)."""
    unavailable: str | None = None
    """Why the family cannot be used yet (None: it can)."""
    check_run: Callable[[Any], None] | None = None
    """``(TrainConfig) -> None``: the family's own start-up checks of a run (ConfigError)."""
    stage_fields: Callable[[Any, bool, bool], tuple[str, ...]] | None = None
    """``(TrainConfig, first stage, last stage) -> fields``: the microbatch keys the chunks of
    such a pipeline stage of that run read (None: every field on every stage)."""
    run_collate: Callable[[Any], Callable[[list], dict]] | None = None
    """``(TrainConfig) -> collate`` of a run whose settings change the microbatches (GPT's
    packed documents, :mod:`megalite.data.documents`); None: ``collate``."""

    def collate_for(self, config) -> Callable[[list], dict]:
        """The collate of a run (``config``: its TrainConfig)."""
        return self.run_collate(config) if self.run_collate is not None else self.collate

    def flops_per_iteration(self, config: TransformerConfig, global_batch_size: int,
                            seq_length: int) -> float:
        """Model FLOPs of one training iteration (forward, dgrad, wgrad) over the global
        batch (:func:`megalite.model.flops.flops_per_iteration` with this family's formula)."""
        return flops_per_iteration(config, global_batch_size, seq_length,
                                   self.forward_flops_per_token)


def _gpt_stage_fields(config, first: bool, last: bool) -> tuple[str, ...]:
    # the embedding reads the tokens, the loss the labels (and --eod-mask-loss's mask); packed
    # documents' positions and ids reach every stage's attention; else a middle stage reads
    # no sample at all
    documents = ("position_ids", "doc_ids") if any(document_flags(config.data).values()) \
        else ()
    return ("tokens",) * first + documents + ("labels", "loss_mask") * last


def _bert_stage_fields(config, first: bool, last: bool) -> tuple[str, ...]:
    # every stage's attention needs the padding mask (and each chunk's call passes the types)
    return (("text",) * first + ("types", "padding_mask")
            + ("labels", "loss_mask", "is_random") * last)


def _tokenizer_size(tokenizer, data) -> int:
    return tokenizer.vocab_size


def _masked_lm_size(tokenizer, data) -> int:
    # Megatron-LM's BERT tokenizer appends [BOS] and [EOS]; the data's random replacements
    # draw from all of its ids
    return masked_lm_vocab(tokenizer).size


def _t5_size(tokenizer, data) -> int:
    # and T5's the --vocab-extra-ids sentinels after them
    return masked_lm_vocab(tokenizer, data.vocab_extra_ids).size


def _check_bert_run(config) -> None:
    """Start-up checks of a BERT run (``config``: its TrainConfig)."""
    refuse_document_flags(config, "bert")


def _check_t5_run(config) -> None:
    """Start-up checks of a T5 run (``config``: its TrainConfig)."""
    refuse_document_flags(config, "t5")
    pp = config.parallel.pipeline_model_parallel_size
    if pp > 1:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} with --model-type t5: the "
                          f"encoder-decoder has no pipeline-parallel implementation in megalite "
                          f"(Megatron-LM splits the encoder and decoder into their own stages; "
                          f"megalite refuses rather than run a different schedule); use 1 and "
                          f"tensor/data parallelism or ZeRO", "parallel",
                          "pipeline_model_parallel_size")
    if not config.model.decoder_seq_length:
        raise ConfigError("--model-type t5 needs --decoder-seq-length (model.decoder_seq_length)"
                          ": the decoder tokens per sample", "model", "decoder_seq_length")


FAMILIES: dict[str, ModelFamily] = {
    "gpt": ModelFamily(
        "gpt", "GPT (decoder-only, classic or LLaMA recipe)", model_class=GPTModel,
        loss_class=GPTLoss, collate=gpt_microbatch, build_datasets=gpt_datasets,
        tokenizer_vocab_size=_tokenizer_size,
        forward_flops_per_token=gpt_forward_flops_per_token,
        activation_bytes_per_layer=activation_bytes_per_layer, hf_converter=hf_models,
        check_run=check_gpt_document_flags, run_collate=packed_gpt_collate,
        stage_fields=_gpt_stage_fields),
    "bert": ModelFamily(
        "bert", "BERT (bidirectional encoder, masked-LM and binary heads)",
        model_class=BertModel, loss_class=BERTLoss, collate=stacked_microbatch,
        build_datasets=bert_datasets, tokenizer_vocab_size=_masked_lm_size,
        forward_flops_per_token=bert_forward_flops_per_token,
        activation_bytes_per_layer=activation_bytes_per_layer, hf_converter=hf_bert,
        vocab_note="the BERT data's: the WordPiece vocab with [BOS] and [EOS] appended, as "
                   "Megatron-LM's BERT tokenizer", check_run=_check_bert_run,
        stage_fields=_bert_stage_fields),
    "t5": ModelFamily(
        "t5", "T5 (encoder-decoder; also the original Transformer's recipe)",
        model_class=EncoderDecoderModel, loss_class=T5Loss, collate=stacked_microbatch,
        build_datasets=t5_datasets, tokenizer_vocab_size=_t5_size,
        forward_flops_per_token=t5_forward_flops_per_token,
        activation_bytes_per_layer=encoder_decoder_activation_bytes, hf_converter=hf_t5,
        vocab_note="the T5 data's: the WordPiece vocab with [BOS], [EOS] and the "
                   "--vocab-extra-ids sentinels appended", check_run=_check_t5_run),
}
assert tuple(FAMILIES) == MODEL_TYPES


def family_of(config_or_type: TransformerConfig | str) -> ModelFamily:
    """The :class:`ModelFamily` of a model config (its ``model_type``) or of a family name;
    MegaliteError naming ``--model-type`` for an unknown family or one not available yet."""
    name = getattr(config_or_type, "model_type", config_or_type)
    family = FAMILIES.get(name)
    if family is None:
        raise MegaliteError(f"--model-type {name!r}: unknown model family (one of "
                            f"{', '.join(FAMILIES)})")
    if family.unavailable:
        raise MegaliteError(f"--model-type {name}: {family.unavailable}")
    return family
