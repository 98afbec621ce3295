"""LayerNorm / RMSNorm over the hidden dimension, tagged for tensor/sequence parallelism.

Norm weights are replicated on every tensor-parallel rank (``tensor_parallel_dim = None``).
With sequence parallelism each rank normalizes a different slice of the sequence, so each rank's
gradient is only a partial sum: those parameters are marked ``sequence_parallel = True`` and the
trainer all-reduces their gradients over the tensor-parallel group
(``megalite.parallel.grad_sync.allreduce_sequence_parallel_grads``).
"""
from __future__ import annotations

from torch import nn

from megalite.model.config import GPTConfig


def mark_replicated(module: nn.Module, sequence_parallel: bool) -> None:
    """Tag every parameter of ``module`` as replicated over tp (grads summed over tp under SP)."""
    for p in module.parameters():
        p.tensor_parallel_dim = None
        p.partition_stride = 1
        p.sequence_parallel = sequence_parallel


def build_norm(config: GPTConfig, device=None, dtype=None) -> nn.Module:
    """``config.normalization`` over ``config.hidden_size``: input [..., h] -> [..., h].

    Uses torch's own ``nn.LayerNorm`` (weight and bias) and ``nn.RMSNorm`` (weight only), which
    match Hugging Face's GPT-2 and LLaMA norms to float32 rounding.
    """
    h, eps = config.hidden_size, config.layernorm_epsilon
    if config.normalization == "LayerNorm":
        norm = nn.LayerNorm(h, eps=eps, device=device, dtype=dtype)
    else:
        norm = nn.RMSNorm(h, eps=eps, device=device, dtype=dtype)
    mark_replicated(norm, config.sequence_parallel)
    return norm
