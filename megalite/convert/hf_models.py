"""The whole-model Hugging Face converters of the GPT family (its ``hf_converter`` in
:mod:`megalite.families`), dispatching on :func:`architecture_of` to the converter module of the
architecture (:mod:`.hf_llama`: LLaMA, Mistral, Qwen2; :mod:`.hf_gpt2`); and
:func:`config_from_hf`, which reads a Hugging Face config of any supported model.

Each converter module exposes ``param_mappings(config)`` (the name map), ``to_hf``/``from_hf``
(whole state dicts) and ``config_to_hf``/``config_from_hf``.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from megalite.convert import hf_gpt2, hf_llama
from megalite.convert.architectures import architecture_of
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig

ARCHITECTURES = {"llama": hf_llama, "gpt2": hf_gpt2}
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
    """The ``transformers`` config (LlamaConfig or GPT2Config) describing the same model."""
    return architecture_module(architecture_of(config)).config_to_hf(config)


def config_from_hf(hf_config) -> TransformerConfig:
    """A :class:`TransformerConfig` from a ``transformers`` LlamaConfig or GPT2Config."""
    MODEL_TYPES = hf_llama.MODEL_TYPES
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in (*MODEL_TYPES, "gpt2"):
        raise MegaliteError(f"unsupported Hugging Face model_type {model_type!r} "
                            f"(supported: {', '.join(MODEL_TYPES)}, gpt2)")
    return architecture_module("llama" if model_type in MODEL_TYPES else model_type).config_from_hf(hf_config)
