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
    h, eps = config.hidden_size, config.layernorm_epsilon
    kw = dict(eps=eps, device=ctx.device, dtype=ctx.dtype)
    norm = nn.LayerNorm(h, **kw) if config.normalization == "LayerNorm" else nn.RMSNorm(h, **kw)
    mark_replicated(norm, config.sequence_parallel)
    return norm
