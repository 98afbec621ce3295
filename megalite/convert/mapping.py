"""The name-map building blocks of the Hugging Face converters.

A converter (:mod:`.hf_llama`, :mod:`.hf_gpt2`) lists one :class:`ParamMapping` per megalite
parameter: its full (unsharded) name, the Hugging Face tensors it is made of and the two pure
functions between them. :func:`to_hf_state_dict` / :func:`from_hf_state_dict` turn such a list
into whole state-dict converters with clear errors on missing or unexpected tensors.

Conventions shared by every architecture:

* megalite state dicts here are *full* (unsharded; gather TP shards first) and use global
  layer ids.
* The megalite vocabulary is padded (``TransformerConfig.padded_vocab``); HF's is not. To HF the padding
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
    """MegaliteError naming (the first few) missing and unexpected tensors of ``state``."""
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MegaliteError(f"{what} does not match the model: missing {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{'...' if len(unexpected) > 5 else ''}")
