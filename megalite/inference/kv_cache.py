"""Inference key/value cache: every layer's keys and values of the tokens seen so far, per rank.

Under tensor parallelism each rank caches only its own key/value groups (``g/tp`` of them, the
ones its query heads read), so the cache is split exactly like the attention weights and decoding
needs no communication beyond the model's own all-reduces.

Buffers are preallocated for ``max_length`` positions, head-major so that the filled prefix
``[:, :, :offset]`` is directly the [b, g/tp, t, d] layout that
``scaled_dot_product_attention`` reads:

* ``keys[layer]``, ``values[layer]``: [b, g/tp, max_length, d] in the model's dtype; keys are
  stored after the rotary embedding (rotated at their absolute position), so they never change.
* ``offset``: number of positions filled (the absolute position of the next token).
* ``cross[layer]`` (decoders of encoder-decoder models): that layer's cross-attention keys and
  values of the encoder output, [b, g/tp, t, d] each, computed by the first forward and reused
  by every later step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from megalite.errors import MegaliteError

__all__ = ["KVCache", "LayerKVCache", "cache_offset"]


def cache_offset(kv_cache, sequence_parallel: bool) -> int:
    """Positions already in ``kv_cache`` (0 without a cache); a model built with sequence
    parallelism cannot use one."""
    if kv_cache is None:
        return 0
    if sequence_parallel:
        raise MegaliteError("a KV cache (inference) cannot be used with sequence "
                            "parallelism; build the model with sequence_parallel=False")
    return kv_cache.offset


@dataclass
class LayerKVCache:
    """One layer's view of a :class:`KVCache` (what ``Attention.forward`` receives)."""

    cache: "KVCache"
    """The cache of the whole model (holds the shared offset)."""
    layer_id: int
    """Global id of the layer (``GPTModel.layers`` key; the decoder's for encoder-decoders)."""

    @property
    def cross(self) -> tuple[Tensor, Tensor] | None:
        """This layer's cached cross-attention (keys, values), or None before the first step."""
        return self.cache.cross.get(self.layer_id)

    @cross.setter
    def cross(self, kv: tuple[Tensor, Tensor]) -> None:
        self.cache.cross[self.layer_id] = kv

    @property
    def offset(self) -> int:
        """Positions already cached (the new tokens start at this absolute position)."""
        return self.cache.offset

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new k, v [b, g/tp, s, d] at ``offset`` and return the filled prefix of the
        buffers, [b, g/tp, offset + s, d] each (views, no copy). The offset itself is advanced
        by the model once all its layers have run (:meth:`KVCache.advance`)."""
        c = self.cache
        keys, values = c.keys[self.layer_id], c.values[self.layer_id]
        end = c.offset + k.shape[2]
        if end > c.max_length:
            raise MegaliteError(f"KV cache holds {c.max_length} positions; {c.offset} are filled "
                                f"and {k.shape[2]} more do not fit")
        if k.shape[:2] != keys.shape[:2] or k.shape[3] != keys.shape[3]:
            raise MegaliteError(f"KV cache of layer {self.layer_id} is [batch, groups, *, d] = "
                                f"{list(keys.shape)}; got keys {list(k.shape)}")
        keys[:, :, c.offset:end] = k
        values[:, :, c.offset:end] = v
        return keys[:, :, :end], values[:, :, :end]


@dataclass
class KVCache:
    """Keys and values of every layer of one model (chunk) on this rank; see module doc."""

    keys: dict[int, Tensor]
    """Layer id -> [b, g/tp, max_length, d] key buffer."""
    values: dict[int, Tensor]
    """Layer id -> [b, g/tp, max_length, d] value buffer."""
    max_length: int
    """Positions the buffers hold (prompt + generated tokens)."""
    offset: int = 0
    """Positions filled so far."""
    cross: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Layer id -> cross-attention (keys, values) of the encoder output (encoder-decoders)."""
    _views: dict[int, LayerKVCache] = field(default_factory=dict, repr=False)

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int) -> "KVCache":
        """Empty cache for ``model`` (a :class:`~megalite.model.gpt.GPTModel`, or the decoder
        of an :class:`~megalite.model.encoder_decoder.EncoderDecoderModel`) on its device and
        in its dtype, for ``batch_size`` sequences of up to ``max_length`` positions (at most
        ``max_position_embeddings``, unless positions are relative)."""
        cfg = model.config
        limit = (cfg.max_position_embeddings if cfg.position_embedding_type != "relative"
                 else max_length)
        if not 1 <= max_length <= limit:
            raise MegaliteError(f"KV cache length {max_length} must be in [1, "
                                f"max_position_embeddings={cfg.max_position_embeddings}]")
        ref = next(model.parameters())
        groups = cfg.query_groups // model.ps.tp_size
        shape = (batch_size, groups, max_length, cfg.head_dim)
        keys, values = {}, {}
        layers = model.decoder.layers if cfg.is_encoder_decoder else model.layers
        for name in layers:
            keys[int(name)] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            values[int(name)] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        return cls(keys=keys, values=values, max_length=max_length)

    def layer(self, layer_id: int) -> LayerKVCache:
        """The view of layer ``layer_id`` handed to its attention."""
        view = self._views.get(layer_id)
        if view is None:
            if layer_id not in self.keys:
                raise MegaliteError(f"KV cache has no layer {layer_id} (has {sorted(self.keys)})")
            view = self._views[layer_id] = LayerKVCache(self, layer_id)
        return view

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions as filled (called by the model after a forward)."""
        self.offset += num_tokens

    def reset(self) -> None:
        """Forget the cached tokens and encoder keys/values (the buffers are reused)."""
        self.offset = 0
        self.cross.clear()
