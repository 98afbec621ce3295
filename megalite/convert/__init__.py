"""Hugging Face <-> megalite: one name map per architecture, and the converters built on it.

Each architecture module (:mod:`.hf_llama`, :mod:`.hf_gpt2`) exposes

* ``param_mappings(config) -> list[ParamMapping]`` -- THE name map: every megalite parameter
  (full, unsharded name and shape) with the Hugging Face tensors it corresponds to and the two
  pure functions converting between them. Checkpoint conversion reuses it per parameter.
* ``config_to_hf(config)`` / ``config_from_hf(hf_config)``.

and this package turns a mapping list into whole state-dict converters (:func:`to_hf_state_dict`,
:func:`from_hf_state_dict`) with clear errors on missing or unexpected tensors.

Conventions shared by both architectures:

* megalite state dicts here are *full* (unsharded; gather TP shards first with
  ``megalite.parallel.layers.gather_full_tensor``) and use global layer ids.
* The megalite vocabulary is padded (``GPTConfig.padded_vocab``); HF's is not. To HF the padding
  rows are dropped; from HF they are added as zeros (their logits are masked, so their values
  never matter).
* The fused QKV weight is stored grouped: for each key/value group g, the rows of its
  ``a/g`` query heads, then its key head, then its value head (each ``head_dim`` rows). A
  contiguous split along rows then gives every tensor-parallel rank whole groups.
* The SwiGLU first MLP weight is ``[gate; up]`` (split with partition_stride 2 under TP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from megalite.errors import MegaliteError
from megalite.model.config import GPTConfig


@dataclass(frozen=True)
class ParamMapping:
    """One megalite parameter and the Hugging Face tensor(s) it is made of."""

    megalite: str
    """Full megalite parameter name, e.g. "layers.3.attention.linear_qkv.weight"."""
    hf: tuple[str, ...]
    """Hugging Face state-dict names, in the order to_hf returns / from_hf takes them."""
    to_hf: Callable[[Tensor], tuple[Tensor, ...]]
    """megalite full tensor -> the HF tensors (same order as ``hf``)."""
    from_hf: Callable[..., Tensor]
    """HF tensors (positional, order of ``hf``) -> megalite full tensor."""


def identity_mapping(megalite: str, hf: str) -> ParamMapping:
    """A tensor that is the same in both (norms, plain linears in [out, in] layout)."""
    return ParamMapping(megalite, (hf,), lambda t: (t,), lambda t: t)


def transposed_mapping(megalite: str, hf: str) -> ParamMapping:
    """HF GPT-2's Conv1D stores [in, out]; megalite linears store [out, in]."""
    return ParamMapping(megalite, (hf,), lambda t: (t.t().contiguous(),),
                        lambda t: t.t().contiguous())


def vocab_mapping(megalite: str, hf: str, vocab_size: int, padded_vocab: int) -> ParamMapping:
    """Embedding/output matrix [V, h]: drop padding rows to HF, zero-pad from HF."""
    def from_hf(t: Tensor) -> Tensor:
        if t.shape[0] != vocab_size:
            raise MegaliteError(f"{hf}: expected {vocab_size} rows (vocab_size), got {t.shape[0]}")
        pad = t.new_zeros(padded_vocab - vocab_size, *t.shape[1:])
        return torch.cat([t, pad], dim=0)
    return ParamMapping(megalite, (hf,), lambda t: (t[:vocab_size].contiguous(),), from_hf)


def qkv_to_grouped(q: Tensor, k: Tensor, v: Tensor, num_groups: int) -> Tensor:
    """Separate q [a*d, ...], k [g*d, ...], v [g*d, ...] -> grouped fused [(a+2g)*d, ...].

    Works for weights ([rows, h]) and biases ([rows]).
    """
    qg = q.reshape(num_groups, -1, *q.shape[1:])
    kg = k.reshape(num_groups, -1, *k.shape[1:])
    vg = v.reshape(num_groups, -1, *v.shape[1:])
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *q.shape[1:]).contiguous()


def grouped_to_qkv(fused: Tensor, num_heads: int, num_groups: int,
                   head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`qkv_to_grouped`: grouped fused rows -> (q, k, v)."""
    qpg = num_heads // num_groups
    g = fused.reshape(num_groups, (qpg + 2) * head_dim, *fused.shape[1:])
    q, k, v = torch.split(g, [qpg * head_dim, head_dim, head_dim], dim=1)
    flat = lambda t: t.reshape(-1, *fused.shape[1:]).contiguous()  # noqa: E731
    return flat(q), flat(k), flat(v)


def to_hf_state_dict(state: Mapping[str, Tensor], mappings: list[ParamMapping],
                     extra: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """Full megalite state dict -> HF state dict.

    ``extra`` maps additional HF names to the HF name they copy (tied ``lm_head.weight``).
    Raises MegaliteError naming any megalite tensor that is missing or not mapped.
    """
    _check_keys(state, [m.megalite for m in mappings], "megalite state dict")
    out: dict[str, Tensor] = {}
    for m in mappings:
        tensors = m.to_hf(state[m.megalite])
        out.update(zip(m.hf, tensors))
    for name, source in (extra or {}).items():
        out[name] = out[source]
    return out


def from_hf_state_dict(hf_state: Mapping[str, Tensor], mappings: list[ParamMapping],
                       ignore: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """HF state dict -> full megalite state dict (names in ``ignore`` may be present or not)."""
    expected = [n for m in mappings for n in m.hf]
    present = {k: v for k, v in hf_state.items() if k not in ignore}
    _check_keys(present, expected, "Hugging Face state dict")
    return {m.megalite: m.from_hf(*(hf_state[n] for n in m.hf)) for m in mappings}


def _check_keys(state: Mapping[str, Tensor], expected: list[str], what: str) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MegaliteError(f"{what} does not match the model: missing {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{'...' if len(unexpected) > 5 else ''}")


def architecture_of(config: GPTConfig) -> str:
    """"llama" for the LLaMA recipe (RMSNorm, rope, swiglu, no bias, untied), "gpt2" for the
    classic recipe with learned positions, LayerNorm, GELU, bias and tied embeddings.

    Raises MegaliteError for mixes no Hugging Face architecture represents exactly.
    """
    c = config
    if (c.normalization == "RMSNorm" and c.position_embedding_type == "rope"
            and c.activation == "swiglu"):
        return "llama"
    if (c.normalization == "LayerNorm" and c.position_embedding_type == "learned_absolute"
            and c.activation in ("gelu", "gelu_tanh") and c.add_bias_linear and c.tied_embeddings
            and c.query_groups == c.num_attention_heads):
        return "gpt2"
    raise MegaliteError("this model config has no exact Hugging Face counterpart (LLaMA needs "
                        "RMSNorm+rope+swiglu; GPT-2 needs LayerNorm+learned positions+gelu+"
                        "bias+tied embeddings+no GQA)")


def _module(arch: str):
    from megalite.convert import hf_gpt2, hf_llama
    return {"llama": hf_llama, "gpt2": hf_gpt2}[arch]


def to_hf(state: Mapping[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Full megalite state dict -> HF state dict of the matching architecture."""
    return _module(architecture_of(config)).to_hf(state, config)


def from_hf(hf_state: Mapping[str, Tensor], config: GPTConfig,
            padded_vocab: int | None = None) -> dict[str, Tensor]:
    """HF state dict -> full megalite state dict (vocab padded to ``padded_vocab``, default
    ``config.padded_vocab(1)``)."""
    return _module(architecture_of(config)).from_hf(hf_state, config, padded_vocab)


def config_to_hf(config: GPTConfig):
    """The ``transformers`` config (LlamaConfig or GPT2Config) describing the same model."""
    return _module(architecture_of(config)).config_to_hf(config)


def config_from_hf(hf_config) -> GPTConfig:
    """A :class:`GPTConfig` from a ``transformers`` LlamaConfig or GPT2Config."""
    from megalite.convert.hf_llama import MODEL_TYPES
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in (*MODEL_TYPES, "gpt2"):
        raise MegaliteError(f"unsupported Hugging Face model_type {model_type!r} "
                            f"(supported: {', '.join(MODEL_TYPES)}, gpt2)")
    return _module("llama" if model_type in MODEL_TYPES else model_type).config_from_hf(hf_config)
