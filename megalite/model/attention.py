"""Self-attention (causal or bidirectional) and cross-attention with grouped-query heads, split
over tensor-parallel ranks by heads.

Shapes (sequence-first, as everywhere inside the transformer; a = query heads, g = key/value
groups, d = head width, tp = tensor-parallel size):

* input x: [s, b, h] (with sequence parallelism [s/tp, b, h]; ``linear_qkv`` all-gathers it)
* ``linear_qkv`` (column-parallel) -> [s, b, (a + 2g) d / tp]. Its full weight is stored grouped
  (per group: a/g query heads, one key head, one value head), so the contiguous row split gives
  rank r the groups g*r/tp .. and exactly the query heads that read them: attention needs no
  communication.
* with ``qk_layernorm`` (Qwen3), each query and key head normalized over d (one [d] weight
  for q, one for k: :func:`megalite.model.norms.build_head_norm`);
* rotary embedding on q and k (LLaMA recipe), then
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=...)`` on
  [b, a/tp, s, d] queries against [b, g/tp, s, d] keys/values (query head j reads group
  j // (a/g), the same pairing as Hugging Face's ``repeat_kv``), scale 1/sqrt(d).
* ``linear_proj`` (row-parallel) -> [s, b, h] (all-reduce) or [s/tp, b, h] (SP reduce-scatter).

Inference (``kv_cache`` given, see :mod:`megalite.inference.kv_cache`): the new keys/values of
this rank's groups are written into the layer's preallocated cache at the current offset, and the
queries attend to every cached position: with the causal mask when the cache was empty (prefill),
with no mask for one new token (decode), and with an offset causal mask otherwise. Queries and
keys arrive already rotated at their absolute positions, so cached keys never change.

Masks. Without a mask the self-attention is causal (``is_causal``, SDPA's fast path) or
unmasked; a :class:`~megalite.model.doc_attention.DocumentMask` (``--reset-attention-mask``)
keeps each query inside its own document of a packed sample; a tensor mask, broadcastable to [b, a/tp, q, k], is either bool (True = attend: BERT's key
padding) or an additive float tensor (0 where a key is seen, the dtype's most negative value
where it is not, plus T5's position bias), built by the model and already holding the causal
part when there is one. Scores are scaled by ``config.softmax_scale`` (None:
1/sqrt(d); T5: 1).

Cross-attention (:class:`CrossAttention`, encoder-decoder decoders): queries from the decoder
(``linear_q``), keys and values from the encoder output (``linear_kv``, whose full weight is
stored per key/value group as [k_g; v_g], so a contiguous row split gives each rank whole
groups), computed once per sequence when generating.

Context parallelism (``ps.cp_size > 1``, training only): the queries, keys and values are
this rank's two chunks of the sequence, and causal self-attention runs as a ring over the CP
group (:func:`megalite.parallel.context_parallel.ring_attention`, which keeps only its inputs,
output and log-sum-exp for backward, so selective recompute has nothing to add there).

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

from megalite.model.config import TransformerConfig
from megalite.model.doc_attention import DocumentMask
from megalite.model.norms import build_head_norm
from megalite.model.positions import apply_rotary
from megalite.parallel.context import ModelContext
from megalite.parallel.context_parallel import RingDocuments, ring_attention
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalite.parallel.random import checkpoint, eager


class _HeadsMixin:
    """Head bookkeeping and the attention core shared by self- and cross-attention."""

    def _init_heads(self, c: TransformerConfig, ctx: ModelContext) -> None:
        tp = ctx.ps.tp_size
        c.validate_parallel(tp)
        self.rng_tracker = ctx.rng_tracker
        self.head_dim = c.head_dim
        self.local_heads = c.num_attention_heads // tp
        self.local_groups = c.query_groups // tp
        self.heads_per_group = c.num_attention_heads // c.query_groups
        self.dropout = c.attention_dropout
        self.scale = c.softmax_scale
        self.selective_recompute = c.recompute_granularity == "selective"
        self.cp_ps = ctx.ps if ctx.ps.cp_size > 1 else None     # context parallelism: a ring

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
              dropout: float = 0.0) -> Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None,
            scale=self.scale, enable_gqa=self.local_heads != self.local_groups)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Training/eval attention (selective recompute when asked) -> [b, a/tp, q, d]."""
        # eager (a graph break under --compile): the ring's p2p collectives, per-document
        # attention (data-dependent splits), and recompute and dropout, which replay RNG states
        if self.cp_ps is not None and self.causal and (mask is None
                                                        or isinstance(mask, RingDocuments)):
            return eager(ring_attention, q, k, v, self.cp_ps, self.scale, mask)
        if self.selective_recompute and torch.is_grad_enabled():
            if mask is None:
                return eager(checkpoint, self.core, self.rng_tracker, q, k, v)
            return eager(checkpoint, self.core, self.rng_tracker, q, k, v, mask)
        if (self.training and self.dropout > 0) or isinstance(mask, DocumentMask):
            return eager(self.core, q, k, v, mask)
        return self.core(q, k, v, mask)

    def core(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """softmax(scale q k^T + mask) v, with dropout on the probabilities; the mask is
        ``mask`` (module doc) or, without one, the causal one (decoders) or none (encoders).
        q [b, a/tp, s, d], k and v [b, g/tp, t, d] -> [b, a/tp, s, d]."""
        p = self.dropout if self.training else 0.0
        ctx = self.rng_tracker.fork() if p > 0 else contextlib.nullcontext()
        with ctx:
            if isinstance(mask, DocumentMask):        # packed documents (doc_attention.py)
                return mask.attend(q, k, v, self.scale, p)
            return self._sdpa(q, k, v, mask, self.causal, p)

    def _output(self, ctx: Tensor) -> Tensor:
        """[b, a/tp, s, d] -> ``linear_proj`` -> [s, b, h] (SP: [s/tp, b, h])."""
        b, _, s, _ = ctx.shape
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)
        return self.linear_proj(ctx)


class Attention(_HeadsMixin, nn.Module):
    """Self-attention: ``forward(x, rope=None, kv_cache=None, attention_mask=None) -> [s, b,
    h]``; ``rope`` is (cos, sin) from RotaryEmbedding; ``causal`` (decoders): the mask when no
    ``attention_mask`` is given (encoders: every key)."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, causal: bool = True):
        super().__init__()
        c = config
        self._init_heads(c, ctx)
        self.causal = causal
        qkv_size = (c.num_attention_heads + 2 * c.query_groups) * c.head_dim
        self.linear_qkv = ColumnParallelLinear(
            c.hidden_size, qkv_size, ctx, bias=c.add_bias_linear or c.add_qkv_bias,
            gather_output=False, sequence_parallel=c.sequence_parallel)
        self.linear_proj = RowParallelLinear(
            c.num_attention_heads * c.head_dim, c.hidden_size, ctx, bias=c.add_bias_linear,
            input_is_parallel=True, sequence_parallel=c.sequence_parallel)
        if c.qk_layernorm:
            self.q_layernorm, self.k_layernorm = build_head_norm(c, ctx), build_head_norm(c, ctx)

    def cached_core(self, q: Tensor, k: Tensor, v: Tensor, kv_cache,
                    mask: Tensor | None = None) -> Tensor:
        """Attention of s new queries q [b, a/tp, s, d] over the cache after appending k, v
        [b, g/tp, s, d] at ``kv_cache.offset`` -> [b, a/tp, s, d] (no dropout: inference).
        ``mask``: the model's additive mask of these queries over all offset + s keys."""
        offset, s = kv_cache.offset, q.shape[2]
        keys, values = kv_cache.append(k, v)                    # [b, g/tp, offset + s, d]
        causal = False
        if mask is not None or not self.causal:
            pass                                                # the model's mask, or none
        elif offset == 0:
            causal = s > 1                                      # prefill: the usual causal mask
        elif s > 1:    # several new tokens after cached ones: query i sees keys <= offset + i
            mask = (torch.arange(offset + s, device=q.device)[None, :]
                    <= offset + torch.arange(s, device=q.device)[:, None])
        return self._sdpa(q, keys, values, mask, causal)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                kv_cache=None, attention_mask: Tensor | None = None) -> Tensor:
        """x [s, b, h] -> [s, b, h]; ``kv_cache``: this layer's inference cache
        (:class:`megalite.inference.kv_cache.LayerKVCache`) or None (training, no cache);
        ``attention_mask``: [b or 1, a/tp or 1, s, keys] (module doc) or None."""
        mask = attention_mask
        qkv = self.linear_qkv(x)                                # [s, b, gl * (a/g + 2) * d]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, :self.heads_per_group].reshape(s, b, self.local_heads, self.head_dim)
        k = qkv[:, :, :, self.heads_per_group]                  # [s, b, g/tp, d]
        v = qkv[:, :, :, self.heads_per_group + 1]
        if hasattr(self, "q_layernorm"):                        # per head, before RoPE
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))   # -> [b, n, s, d]
        if kv_cache is not None:
            return self._output(self.cached_core(q, k, v, kv_cache, mask))
        return self._output(self._attend(q, k, v, mask))


class CrossAttention(_HeadsMixin, nn.Module):
    """Decoder-to-encoder attention: ``forward(x [s, b, h], memory_kv, mask=None) ->
    [s, b, h]`` with ``memory_kv = key_values(encoder output [t, b, h])``."""

    causal = False

    def __init__(self, config: TransformerConfig, ctx: ModelContext):
        super().__init__()
        c = config
        self._init_heads(c, ctx)
        bias = c.add_bias_linear or c.add_qkv_bias
        self.linear_q = ColumnParallelLinear(
            c.hidden_size, c.num_attention_heads * c.head_dim, ctx, bias=bias,
            gather_output=False, sequence_parallel=c.sequence_parallel)
        self.linear_kv = ColumnParallelLinear(
            c.hidden_size, 2 * c.query_groups * c.head_dim, ctx, bias=bias,
            gather_output=False, sequence_parallel=c.sequence_parallel)
        self.linear_proj = RowParallelLinear(
            c.num_attention_heads * c.head_dim, c.hidden_size, ctx, bias=c.add_bias_linear,
            input_is_parallel=True, sequence_parallel=c.sequence_parallel)

    def key_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output [t, b, h] (SP: [t/tp, b, h]) -> this rank's keys and values,
        [b, g/tp, t, d] each."""
        kv = self.linear_kv(memory)                             # [t, b, g/tp * 2 * d]
        t, b = kv.shape[:2]
        kv = kv.view(t, b, self.local_groups, 2, self.head_dim).permute(3, 1, 2, 0, 4)
        return kv[0], kv[1]

    def forward(self, x: Tensor, memory_kv: tuple[Tensor, Tensor],
                mask: Tensor | None = None) -> Tensor:
        q = self.linear_q(x)                                    # [s, b, a/tp * d]
        s, b = q.shape[:2]
        q = q.view(s, b, self.local_heads, self.head_dim).permute(1, 2, 0, 3)
        k, v = memory_kv
        return self._output(self._attend(q, k, v, mask))
