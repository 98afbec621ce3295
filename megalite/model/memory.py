"""Activation memory of the transformer layers, for the ``--dry-run`` memory estimate
(:mod:`megalite.training.dry_run`); the family registry (:mod:`megalite.families`) names the
estimate of each family.

Per layer and microbatch (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", 16-bit activations; x2 for fp32), with s sequence, b micro batch, h hidden,
a heads, t TP size: no recompute ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` (``s*b*h*(34 +
5*a*s/h)/t`` with sequence parallelism); selective recompute drops the ``5*a*s/h`` term; full
recompute keeps only the layer input ``2*s*b*h`` (divided by t with sequence parallelism). The
formula counts the whole s x s score matrix, so it holds for causal (GPT) and bidirectional
(BERT) self-attention alike.
"""
from __future__ import annotations

__all__ = ["activation_bytes_per_layer"]


def activation_bytes_per_layer(config, tp: int) -> float:
    """Activation bytes of one transformer layer for one microbatch of ``config`` (a
    :class:`~megalite.config.TrainConfig`) at tensor-parallel size ``tp`` (formula above)."""
    m = config.model
    s, b, h, a = m.training_seq_length, config.training.micro_batch_size, m.hidden_size, \
        m.num_attention_heads
    sp = config.parallel.sequence_parallel
    scale = 1.0 if (config.precision.bf16 or config.precision.fp16) else 2.0
    if m.recompute_granularity == "full":
        return 2 * s * b * h / (tp if sp else 1) * scale
    attn = 0.0 if m.recompute_granularity == "selective" else 5 * a * s / h
    per = 34 / tp + attn / tp if sp else 10 + 24 / tp + attn / tp
    return s * b * h * per * scale
