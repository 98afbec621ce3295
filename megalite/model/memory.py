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

Encoder-decoders: encoder layers at the encoder length t_e, decoder layers at the decoder
length t_d plus their cross-attention, by the same accounting: its norm input, query input and
dropout mask ``5*t_d*b*h`` (divided by t with SP), queries and output-projection input
``4*t_d*b*h/t``, keys and values ``4*t_e*b*h/t`` and the scores ``5*a*t_d*t_e*b/t`` (dropped
by selective recompute); the encoder output they read is held once for the model, not counted.
"""
from __future__ import annotations

__all__ = ["activation_bytes_per_layer", "encoder_decoder_activation_bytes"]


def _layer_bytes(config, tp: int, s: int) -> float:
    """Bytes of one self-attention layer over ``s`` tokens (module doc)."""
    m = config.model
    b, h, a = config.training.micro_batch_size, m.hidden_size, m.num_attention_heads
    sp = config.parallel.sequence_parallel
    scale = 1.0 if (config.precision.bf16 or config.precision.fp16) else 2.0
    if m.recompute_granularity == "full":
        return 2 * s * b * h / (tp if sp else 1) * scale
    attn = 0.0 if m.recompute_granularity == "selective" else 5 * a * s / h
    per = 34 / tp + attn / tp if sp else 10 + 24 / tp + attn / tp
    return s * b * h * per * scale


def activation_bytes_per_layer(config, tp: int) -> float:
    """Activation bytes of one transformer layer for one microbatch of ``config`` (a
    :class:`~megalite.config.TrainConfig`) at tensor-parallel size ``tp`` (formula above)."""
    return _layer_bytes(config, tp, config.model.training_seq_length)


def encoder_decoder_activation_bytes(config, tp: int) -> float:
    """An encoder-decoder's activation bytes of all its layers for one microbatch, per encoder
    layer (the dry run counts ``num_layers`` layers in flight): module doc."""
    m = config.model
    enc, dec = m.training_seq_length, m.decoder_seq_length or m.training_seq_length
    b, h, a = config.training.micro_batch_size, m.hidden_size, m.num_attention_heads
    sp = config.parallel.sequence_parallel
    scale = 1.0 if (config.precision.bf16 or config.precision.fp16) else 2.0
    cross = 0.0
    if m.recompute_granularity != "full":
        cross = (dec * b * h * (5 / tp if sp else 5) + 4 * dec * b * h / tp
                 + 4 * enc * b * h / tp) * scale
        if m.recompute_granularity != "selective":
            cross += 5 * a * dec * enc * b / tp * scale
    total = (m.num_layers * _layer_bytes(config, tp, enc)
             + m.decoder_layers * (_layer_bytes(config, tp, dec) + cross))
    return total / m.num_layers
