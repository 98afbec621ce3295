"""The whole-model Hugging Face converters, dispatching on :func:`architecture_of` to the
converter module of the architecture (:mod:`.hf_llama`: LLaMA, Mistral, Qwen2; :mod:`.hf_gpt2`;
:mod:`.hf_t5`: T5, an encoder-decoder).

Each converter module exposes ``param_mappings(config)`` (the name map), ``to_hf``/``from_hf``
(whole state dicts) and ``config_to_hf``/``config_from_hf``.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from megalite.convert import hf_gpt2, hf_llama, hf_t5
from megalite.convert.architectures import architecture_of
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig

ARCHITECTURES = {"llama": hf_llama, "gpt2": hf_gpt2, "t5": hf_t5}
"""Architecture name -> its converter module."""


def architecture_module(arch: str):
    """The converter module of architecture ``arch`` ("llama", "gpt2" or "t5")."""
    return ARCHITECTURES[arch]


def to_hf(state: Mapping[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """Full megalite state dict -> HF state dict of the matching architecture."""
    return architecture_module(architecture_of(config)).to_hf(state, config)


def from_hf(hf_state: Mapping[str, Tensor], config: TransformerConfig,
            padded_vocab: int | None = None) -> dict[str, Tensor]:
    """HF state dict -> full megalite state dict (vocab padded to ``padded_vocab``, default
    ``config.padded_vocab(1)``)."""
    return architecture_module(architecture_of(config)).from_hf(hf_state, config, padded_vocab)


def config_to_hf(config: TransformerConfig):
    """The ``transformers`` config (LlamaConfig, GPT2Config or T5Config) describing the same
    model."""
    return architecture_module(architecture_of(config)).config_to_hf(config)


def config_from_hf(hf_config, **options) -> TransformerConfig:
    """A :class:`TransformerConfig` from a ``transformers`` LlamaConfig, GPT2Config or T5Config
    (``options``: T5's ``tied``, see :func:`megalite.convert.hf_t5.config_from_hf`)."""
    MODEL_TYPES = hf_llama.MODEL_TYPES
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in (*MODEL_TYPES, "gpt2", "t5"):
        raise MegaliteError(f"unsupported Hugging Face model_type {model_type!r} "
                            f"(supported: {', '.join(MODEL_TYPES)}, gpt2, t5)")
    arch = "llama" if model_type in MODEL_TYPES else model_type
    return architecture_module(arch).config_from_hf(hf_config, **options)
