"""LayerNorm / RMSNorm over the hidden dimension, tagged for tensor/sequence parallelism.

Norm weights are replicated on every tensor-parallel rank (``tensor_parallel_dim = None``).
With sequence parallelism each rank normalizes a different slice of the sequence, so each rank's
gradient is only a partial sum: those parameters are marked ``sequence_parallel = True`` and the
trainer all-reduces their gradients over the tensor-parallel group
(``megalite.parallel.grad_sync.allreduce_sequence_parallel_grads``).
"""
from __future__ import annotations

from torch import nn

from megalite.model.config import TransformerConfig
from megalite.parallel.context import ModelContext
from megalite.parallel.sharding import set_sharding


def mark_replicated(module: nn.Module, sequence_parallel: bool) -> None:
    """Tag every parameter of ``module`` as replicated over tp (grads summed over tp under SP)."""
    for p in module.parameters():
        set_sharding(p, None, 1, sequence_parallel)


def build_norm(config: TransformerConfig, ctx: ModelContext) -> nn.Module:
    """``config.normalization`` over ``config.hidden_size`` with parameters on ``ctx.device`` in
    ``ctx.dtype``: input [..., h] -> [..., h].

    Uses torch's own ``nn.LayerNorm`` (weight and bias) and ``nn.RMSNorm`` (weight only), which
    match Hugging Face's GPT-2 and LLaMA norms to float32 rounding.
    """
    return _norm(config, ctx, config.hidden_size, config.sequence_parallel)


def build_head_norm(config: TransformerConfig, ctx: ModelContext) -> nn.Module:
    """``config.normalization`` over ``config.head_dim``, the query/key norm of
    ``qk_layernorm``: input [..., heads, d] -> the same shape, each head normalized alone.

    Its weight [d] is replicated on every tp rank, but each rank applies it to its own heads
    only, so with tp > 1 each rank's gradient is a partial sum (with or without sequence
    parallelism): it is marked like the norm weights under SP and summed over tp by the same
    collective.
    """
    return _norm(config, ctx, config.head_dim, ctx.ps.tp_size > 1)


def _norm(config: TransformerConfig, ctx: ModelContext, width: int,
          partial_grad: bool) -> nn.Module:
    kw = dict(eps=config.layernorm_epsilon, device=ctx.device, dtype=ctx.dtype)
    norm = (nn.LayerNorm(width, **kw) if config.normalization == "LayerNorm"
            else nn.RMSNorm(width, **kw))
    mark_replicated(norm, partial_grad)
    return norm
