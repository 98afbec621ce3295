"""One transformer layer of any family: self-attention, optionally cross-attention (decoders of
encoder-decoder models), then the MLP, each a residual sublayer.

    pre-norm  (GPT, LLaMA, T5):             x + dropout(f(Norm(x)))
    post-norm (the original Transformer):   Norm(x + dropout(f(x)))

Parameter names (under the layer's prefix): ``input_norm`` and ``attention`` (self-attention),
``cross_attention_norm`` and ``cross_attention`` (decoders of encoder-decoder models only),
``post_attention_norm`` and ``mlp``. Each norm belongs to the sublayer it is named with,
whichever side of the residual it sits on.

Dropout RNG: dropout on tensors split across tensor-parallel ranks (attention probabilities;
with SP also the residual-branch dropout) draws from the tracker's "model-parallel" stream, so
masks differ per rank; dropout on replicated tensors uses the default generator, identical on
all tensor-parallel ranks, so the replicas stay equal.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from megalite.errors import MegaliteError
from megalite.model.attention import Attention, CrossAttention
from megalite.model.config import TransformerConfig
from megalite.model.mlp import MLP
from megalite.model.norms import build_norm
from megalite.parallel.context import ModelContext
from megalite.parallel.random import RNGStatesTracker

__all__ = ["TransformerLayer", "dropout"]


def dropout(x: Tensor, p: float, training: bool, tracker: RNGStatesTracker, split: bool) -> Tensor:
    """Dropout drawing from the "model-parallel" stream when ``x`` is split across tp ranks."""
    if not training or p == 0.0:
        return x
    with tracker.fork() if split else contextlib.nullcontext():
        return F.dropout(x, p, training=True)


class TransformerLayer(nn.Module):
    """``forward(x [s, b, h], cos=None, sin=None, kv_cache=None, mask=None, memory=None,
    memory_mask=None) -> [s, b, h]`` (with SP [s/tp, b, h] in and out).

    ``causal``: the self-attention mask when no ``mask`` is given. ``cross_attention``: a
    decoder layer of an encoder-decoder model, attending to ``memory`` (the encoder output
    [t, b, h]) under ``memory_mask`` (additive, see :mod:`megalite.model.attention`).
    ``kv_cache`` (inference): this layer's view of the cache; it also keeps the cross-attention
    keys/values, computed from ``memory`` the first time and reused after.
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, causal: bool = True,
                 cross_attention: bool = False):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.post_norm = config.norm_placement == "post"
        self.split = config.sequence_parallel and ctx.ps.tp_size > 1
        self.rng_tracker = ctx.rng_tracker
        self.input_norm = build_norm(config, ctx)
        self.attention = Attention(config, ctx, causal=causal)
        if cross_attention:
            self.cross_attention_norm = build_norm(config, ctx)
            self.cross_attention = CrossAttention(config, ctx)
        self.post_attention_norm = build_norm(config, ctx)
        self.mlp = MLP(config, ctx)

    def forward(self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
                kv_cache=None, mask: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        rope = None if cos is None else (cos, sin)
        x = self._sublayer(x, self.input_norm,
                           lambda h: self.attention(h, rope, kv_cache, mask))
        if hasattr(self, "cross_attention"):
            kv = self._memory_kv(memory, kv_cache)
            x = self._sublayer(x, self.cross_attention_norm,
                               lambda h: self.cross_attention(h, kv, memory_mask))
        return self._sublayer(x, self.post_attention_norm, self.mlp)

    def _memory_kv(self, memory: Tensor | None, kv_cache) -> tuple[Tensor, Tensor]:
        cached = None if kv_cache is None else kv_cache.cross
        if cached is not None:
            return cached
        if memory is None:
            raise MegaliteError("a decoder layer needs the encoder output (memory) or cached "
                             "cross-attention keys/values")
        kv = self.cross_attention.key_values(memory)
        if kv_cache is not None:
            kv_cache.cross = kv
        return kv

    def _sublayer(self, x: Tensor, norm: nn.Module, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.post_norm:
            return norm(x + self._drop(fn(x)))
        return x + self._drop(fn(norm(x)))

    def _drop(self, t: Tensor) -> Tensor:
        return dropout(t, self.hidden_dropout, self.training, self.rng_tracker, self.split)
