"""Self-attention (causal, or bidirectional with a padding mask) with grouped-query heads, split
over tensor-parallel ranks by heads.

Shapes (sequence-first, as everywhere inside the transformer; a = query heads, g = key/value
groups, d = head width, tp = tensor-parallel size):

* input x: [s, b, h] (with sequence parallelism [s/tp, b, h]; ``linear_qkv`` all-gathers it)
* ``linear_qkv`` (column-parallel) -> [s, b, (a + 2g) d / tp]. Its full weight is stored grouped
  (per group: a/g query heads, one key head, one value head), so the contiguous row split gives
  rank r the groups g*r/tp .. and exactly the query heads that read them: attention needs no
  communication.
* rotary embedding on q and k (LLaMA recipe), then
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=..., enable_gqa=...)`` on
  [b, a/tp, s, d] queries against [b, g/tp, s, d] keys/values (query head j reads group
  j // (a/g), the same pairing as Hugging Face's ``repeat_kv``), scale 1/sqrt(d).
* ``linear_proj`` (row-parallel) -> [s, b, h] (all-reduce) or [s/tp, b, h] (SP reduce-scatter).

Inference (``kv_cache`` given, see :mod:`megalite.inference.kv_cache`): the new keys/values of
this rank's groups are written into the layer's preallocated cache at the current offset, and the
queries attend to every cached position: with the causal mask when the cache was empty (prefill),
with no mask for one new token (decode), and with an offset causal mask otherwise. Queries and
keys arrive already rotated at their absolute positions, so cached keys never change.

Attention dropout acts on a tensor split by heads, so it draws from the tracker's
"model-parallel" stream (different masks on different ranks). Selective recompute wraps the
attention core (the part whose activations grow with s^2) in
``megalite.parallel.random.checkpoint``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.positions import apply_rotary
from megalite.parallel.context import ModelContext
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalite.parallel.random import checkpoint


class Attention(nn.Module):
    """``forward(x, rope=None, kv_cache=None, attention_mask=None) -> [s, b, h]``; ``rope`` is
    (cos, sin) from RotaryEmbedding. ``causal`` (decoders) adds the causal mask; an encoder's
    (``causal=False``) queries see every key, or those ``attention_mask`` allows."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext, causal: bool = True):
        super().__init__()
        self.causal = causal
        c, tp = config, ctx.ps.tp_size
        config.validate_parallel(tp)
        self.rng_tracker = ctx.rng_tracker
        self.head_dim = c.head_dim
        self.local_heads = c.num_attention_heads // tp
        self.local_groups = c.query_groups // tp
        self.heads_per_group = c.num_attention_heads // c.query_groups
        self.dropout = c.attention_dropout
        self.selective_recompute = c.recompute_granularity == "selective"
        qkv_size = (c.num_attention_heads + 2 * c.query_groups) * c.head_dim
        self.linear_qkv = ColumnParallelLinear(
            c.hidden_size, qkv_size, ctx, bias=c.add_bias_linear or c.add_qkv_bias,
            gather_output=False, sequence_parallel=c.sequence_parallel)
        self.linear_proj = RowParallelLinear(
            c.num_attention_heads * c.head_dim, c.hidden_size, ctx, bias=c.add_bias_linear,
            input_is_parallel=True, sequence_parallel=c.sequence_parallel)

    def core(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """softmax(q k^T / sqrt(d) + mask) v, with dropout on the probabilities; the mask is
        the causal one (decoders) or ``mask`` (bool [b, 1, 1 or s, s], True = attend; None:
        every key).

        q [b, a/tp, s, d], k and v [b, g/tp, s, d] -> [b, a/tp, s, d].
        """
        p = self.dropout if self.training else 0.0
        ctx = self.rng_tracker.fork() if p > 0 else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=self.causal,
                enable_gqa=self.local_heads != self.local_groups)

    def cached_core(self, q: Tensor, k: Tensor, v: Tensor, kv_cache) -> Tensor:
        """Attention of s new queries q [b, a/tp, s, d] over the cache after appending k, v
        [b, g/tp, s, d] at ``kv_cache.offset`` -> [b, a/tp, s, d] (no dropout: inference)."""
        offset, s = kv_cache.offset, q.shape[2]
        keys, values = kv_cache.append(k, v)                    # [b, g/tp, offset + s, d]
        mask, causal = None, False
        if offset == 0:
            causal = s > 1                                      # prefill: the usual causal mask
        elif s > 1:    # several new tokens after cached ones: query i sees keys <= offset + i
            mask = (torch.arange(offset + s, device=q.device)[None, :]
                    <= offset + torch.arange(s, device=q.device)[:, None])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.local_heads != self.local_groups)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                kv_cache=None, attention_mask: Tensor | None = None) -> Tensor:
        """x [s, b, h] -> [s, b, h]; ``kv_cache``: this layer's inference cache
        (:class:`megalite.inference.kv_cache.LayerKVCache`) or None (training, no cache);
        ``attention_mask``: bool [b, 1, 1, s] (True = attend) for a non-causal attention, or
        None."""
        if attention_mask is not None and (self.causal or kv_cache is not None):
            raise MegaliteError("an attention mask is for encoder (non-causal) self-attention "
                                "without a KV cache")
        qkv = self.linear_qkv(x)                                # [s, b, gl * (a/g + 2) * d]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, :self.heads_per_group].reshape(s, b, self.local_heads, self.head_dim)
        k = qkv[:, :, :, self.heads_per_group]                  # [s, b, g/tp, d]
        v = qkv[:, :, :, self.heads_per_group + 1]
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))   # -> [b, n, s, d]
        if kv_cache is not None:
            ctx = self.cached_core(q, k, v, kv_cache)
        elif self.selective_recompute and torch.is_grad_enabled():
            ctx = checkpoint(self.core, self.rng_tracker, q, k, v, attention_mask)
        else:
            ctx = self.core(q, k, v, attention_mask)
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)
        return self.linear_proj(ctx)
