"""Position information: rotary embedding (RoPE), the fixed sinusoidal table and T5's relative
position bias.

(The learned absolute table is a plain replicated ``nn.Embedding`` owned by the embedding block
in :mod:`megalite.model.gpt`.)

RoPE uses the "rotate half" convention of Megatron and Hugging Face's LLaMA: the head vector is
split into halves (x1, x2) and pair i = (x1[i], x2[i]) is rotated by angle pos * inv_freq[i],
inv_freq[i] = base^(-2i/d). Weights converted from HF LLaMA therefore need no permutation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megalite.parallel.sharding import set_sharding


def sinusoidal_table(num_positions: int, dim: int, *, dtype=torch.float32, device=None) -> Tensor:
    """[num_positions, dim]: PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(...).

    Computed in float64 then cast, so the table does not depend on the device's float32 math.
    """
    pos = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None]
    two_i = torch.arange(0, dim, 2, dtype=torch.float64, device=device)
    angle = pos / torch.pow(10000.0, two_i / dim)              # [P, dim/2]
    table = torch.empty(num_positions, dim, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table.to(dtype)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal table (no parameters); ``forward(s) -> [s, h]``.

    The table is a non-persistent buffer: computed at construction (or by :meth:`reset` after
    a meta-device model was materialized with ``to_empty``), never checkpointed.
    """

    def __init__(self, max_positions: int, hidden_size: int, device=None):
        super().__init__()
        meta = device is not None and torch.device(device).type == "meta"
        table = (torch.empty(max_positions, hidden_size, device="meta") if meta
                 else sinusoidal_table(max_positions, hidden_size, device=device))
        self.register_buffer("table", table, persistent=False)

    @torch.no_grad()
    def reset(self) -> None:
        """Recompute the table in place (no-op on the meta device)."""
        if self.table.device.type != "meta":
            self.table.copy_(sinusoidal_table(*self.table.shape, device=self.table.device))

    def forward(self, seq_len: int) -> Tensor:
        return self.table[:seq_len]


def rope_inv_freq(head_dim: int, base: float, scaling: str | None = None, *,
                  factor: float = 8.0, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0, original_max_positions: int = 8192,
                  device=None) -> Tensor:
    """[head_dim / 2] float32 rotary frequencies inv_freq_i = base^(-2i/head_dim), optionally
    scaled for a longer context (see ``TransformerConfig.rope_scaling``):

    * ``"linear"``: every frequency / factor (position interpolation);
    * ``"llama3"``: with wavelength w_i = 2 pi / inv_freq_i and L = original_max_positions,
      w_i < L / high_freq_factor: kept; w_i > L / low_freq_factor: / factor; in between the
      blend (1 - a) inv_freq_i / factor + a inv_freq_i, a = (L / w_i - low) / (high - low).

    Computed the way HF LLaMA computes it (int64 arange -> float32), so the angles agree bit for
    bit with the reference.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (base ** (exponent / head_dim))
    if scaling is None:
        return inv_freq
    if scaling == "linear":
        return inv_freq / factor
    if scaling != "llama3":
        raise ValueError(f"unknown rope scaling {scaling!r}")
    wavelen = 2 * math.pi / inv_freq
    long_wavelen = original_max_positions / low_freq_factor    # beyond: fully scaled
    short_wavelen = original_max_positions / high_freq_factor  # below: kept
    scaled = torch.where(wavelen > long_wavelen, inv_freq / factor, inv_freq)
    a = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - a) * scaled / factor + a * scaled
    between = ~(wavelen < short_wavelen) & ~(wavelen > long_wavelen)
    return torch.where(between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for heads of width ``head_dim``.

    ``forward(s) -> (cos, sin)``, each [s, 1, 1, head_dim] in float32, broadcastable against
    sequence-first heads [s, b, n, head_dim]. The tables are recomputed per call (cheap next to
    attention) rather than cached, so they never go stale across devices or dtypes.
    ``scaling`` and ``scaling_args``: see :func:`rope_inv_freq`.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: str | None = None,
                 **scaling_args):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.scaling, self.scaling_args = scaling, scaling_args

    @classmethod
    def from_config(cls, config) -> "RotaryEmbedding":
        """The rotary embedding of a :class:`~megalite.model.config.TransformerConfig`."""
        c = config
        return cls(c.head_dim, c.rotary_base, c.rope_scaling, factor=c.rope_scaling_factor,
                   low_freq_factor=c.rope_low_freq_factor,
                   high_freq_factor=c.rope_high_freq_factor,
                   original_max_positions=c.rope_original_max_position_embeddings)

    def forward(self, seq_len: int, device=None) -> tuple[Tensor, Tensor]:
        inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling, device=device,
                                 **self.scaling_args)                           # [d/2]
        pos = torch.arange(seq_len, dtype=torch.int64, device=device).float()
        freqs = torch.outer(pos, inv_freq)                                     # [s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                # [s, d]
        return emb.cos()[:, None, None, :], emb.sin()[:, None, None, :]

    def at(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) of per-token positions ``position_ids`` [b, s] (packed documents with
        ``--reset-position-ids``), each [s, b, 1, head_dim] float32; the same angles as
        :meth:`forward` gives a position."""
        inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling,
                                 device=position_ids.device, **self.scaling_args)  # [d/2]
        freqs = position_ids.t().float()[..., None] * inv_freq                   # [s, b, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]                   # [s, b, 1, d]
        return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate heads ``x`` [s, b, n, d] by the angles behind (cos, sin) [s, 1, 1, d] (or
    [s, b, 1, d]: per-token positions).

    Math in float32, result in x's dtype.
    """
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def relative_position_buckets(query_positions: Tensor, key_positions: Tensor, *,
                              bidirectional: bool, num_buckets: int,
                              max_distance: int) -> Tensor:
    """T5's bucket of every (query, key) pair: int64 [q, k] in ``[0, num_buckets)``.

    With n = num_buckets (halved when ``bidirectional``: keys after the query take the upper
    half) and r = |key - query| (causal: only keys at or before the query, r = query - key,
    later keys read bucket 0 and are masked anyway): r < n/2 is its own bucket; larger r fall
    in n/2 logarithmic buckets reaching max_distance, n/2 + floor(log(2r/n) / log(2 M/n) *
    n/2), capped at n - 1. The float32 log and the truncation are Mesh TensorFlow's, so the
    buckets equal Hugging Face's T5.
    """
    rel = key_positions[None, :] - query_positions[:, None]          # [q, k]
    n = num_buckets
    base = torch.zeros_like(rel)
    if bidirectional:
        n //= 2
        base = torch.where(rel > 0, n, 0)
        distance = rel.abs()
    else:
        distance = (-rel).clamp(min=0)
    exact = n // 2
    # distance 0 would log to -inf; those entries take the exact branch below.
    scaled = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (scaled * (n - exact)).to(torch.long)).clamp(max=n - 1)
    return base + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's relative position bias of one stack: ``forward(q_pos [q], k_pos [k]) ->
    [1, a/tp, q, k]`` added to the attention scores of every layer of the stack.

    ``weight`` [num_buckets, a] is split over tensor-parallel ranks by heads (dim 1): each
    rank holds the columns of its own query heads, whose attention it computes, so its
    gradient is complete (no sum over ranks, with or without sequence parallelism).
    """

    def __init__(self, config, ctx, *, bidirectional: bool):
        super().__init__()
        tp = ctx.ps.tp_size
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.weight = set_sharding(nn.Parameter(torch.empty(
            self.num_buckets, config.num_attention_heads // tp, device=ctx.device,
            dtype=ctx.dtype)), 1)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        buckets = relative_position_buckets(
            query_positions, key_positions, bidirectional=self.bidirectional,
            num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.weight[buckets].permute(2, 0, 1).unsqueeze(0)     # [1, a/tp, q, k]
