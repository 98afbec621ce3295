"""The whole-model Hugging Face converters of the GPT family (its ``hf_converter`` in
:mod:`megalite.families`), dispatching on :func:`architecture_of` to the converter module of the
architecture (:mod:`.hf_llama`: LLaMA, Mistral, Qwen2, Qwen3; :mod:`.hf_moe`: Mixtral,
Qwen2-MoE, Qwen3-MoE; :mod:`.hf_gpt2`); and
:func:`config_from_hf`, which reads a Hugging Face config of any supported model.

Each converter module exposes ``param_mappings(config)`` (the name map), ``to_hf``/``from_hf``
(whole state dicts) and ``config_to_hf``/``config_from_hf``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from megalite.convert import hf_bert, hf_gpt2, hf_llama, hf_moe, hf_t5
from megalite.convert.architectures import architecture_of
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
"""The tokenizer files ``from-hf`` looks for, in order (hf_tokenizer.import_tokenizer)."""

ARCHITECTURES = {"llama": hf_llama, "gpt2": hf_gpt2, "moe": hf_moe}
"""Architecture name -> its converter module."""


def architecture_module(arch: str):
    """The converter module of architecture ``arch`` ("llama" or "gpt2")."""
    return ARCHITECTURES[arch]


def param_mappings(config: TransformerConfig, padded_vocab: int | None = None) -> list:
    """The name map (``ParamMapping`` list) of the matching architecture."""
    return architecture_module(architecture_of(config)).param_mappings(config, padded_vocab)


def to_hf(state: Mapping[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """Full megalite state dict -> HF state dict of the matching architecture."""
    return architecture_module(architecture_of(config)).to_hf(state, config)


def from_hf(hf_state: Mapping[str, Tensor], config: TransformerConfig,
            padded_vocab: int | None = None) -> dict[str, Tensor]:
    """HF state dict -> full megalite state dict (vocab padded to ``padded_vocab``, default
    ``config.padded_vocab(1)``)."""
    return architecture_module(architecture_of(config)).from_hf(hf_state, config, padded_vocab)


def config_to_hf(config: TransformerConfig):
    """The ``transformers`` config (LlamaConfig, GPT2Config, MixtralConfig, ...) describing the same model."""
    return architecture_module(architecture_of(config)).config_to_hf(config)


def extra_tensors(config: TransformerConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Hugging Face tensors with no megalite parameter behind them: none for GPT models."""
    return {}


def hf_model_class(config: TransformerConfig):
    """The ``transformers`` auto class that loads the converted model (``--verify``)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM


def verify_logits(ours, theirs, tokens: Tensor, config: TransformerConfig
                  ) -> tuple[Tensor, Tensor]:
    """(megalite's, Hugging Face's) logits [n, s, V] of ``tokens`` [n, s] over the Hugging
    Face model's vocabulary."""
    return (ours(tokens)[..., :theirs.config.vocab_size].float(),
            theirs(input_ids=tokens).logits.float())


def ignored_names(config: TransformerConfig, names) -> tuple[str, ...]:
    """Tensors of a Hugging Face checkpoint (``names``) the megalite model does not hold: the
    tied ``lm_head.weight``, rotary and causal-mask buffers of older checkpoints."""
    drop = [n for n in names if n.endswith((".rotary_emb.inv_freq", ".attn.masked_bias"))
            or (n.endswith(".attn.bias") and n.startswith("transformer.h."))]
    if config.tied_embeddings:
        drop.append("lm_head.weight")
    return tuple(drop)


def config_from_hf(hf_config, names=None, get=None) -> TransformerConfig:
    """A :class:`TransformerConfig` from a ``transformers`` config of a supported model:
    LLaMA, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-2 (the GPT family), BERT
    or Megatron-BERT (the BERT family, :mod:`.hf_bert`; ``names``, the checkpoint's tensor
    names, tell whether it has the binary head), T5 (:mod:`.hf_t5`; ``names`` and ``get``, name -> tensor, tell whether its output
    layer is tied)."""
    llama = hf_llama.MODEL_TYPES
    model_type = getattr(hf_config, "model_type", None)
    if model_type in hf_bert.MODEL_TYPES:
        return hf_bert.config_from_hf(hf_config, names)
    if model_type in hf_t5.MODEL_TYPES:
        return hf_t5.config_from_hf(hf_config, names, get)
    if model_type in hf_moe.MODEL_TYPES:
        return hf_moe.config_from_hf(hf_config)
    if model_type not in (*llama, "gpt2"):
        supported = (llama + ("gpt2",) + hf_moe.MODEL_TYPES + hf_bert.MODEL_TYPES
                     + hf_t5.MODEL_TYPES)
        raise MegaliteError(f"unsupported Hugging Face model_type {model_type!r} "
                            f"(supported: {', '.join(supported)})")
    return architecture_module("llama" if model_type in llama else model_type
                               ).config_from_hf(hf_config)
