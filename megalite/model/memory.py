"""Activation memory of the transformer layers, for the ``--dry-run`` memory estimate
(:mod:`megalite.training.dry_run`); the family registry (:mod:`megalite.families`) names the
estimate of each family.

Per layer and microbatch (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", 16-bit activations; x2 for fp32), with s sequence, b micro batch, h hidden,
a heads, t TP size: no recompute ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` (``s*b*h*(34 +
5*a*s/h)/t`` with sequence parallelism); selective recompute drops the ``5*a*s/h`` term; full
recompute keeps only the layer input ``2*s*b*h`` (divided by t with sequence parallelism).

The ``5*a*s/h`` term is the s x s score matrix (softmax output, dropout mask and dropped
probabilities): it is counted only where the attention megalite runs keeps it for backward.
Every attention goes through ``F.scaled_dot_product_attention`` (GPT causal without a mask,
also per document with ``--reset-attention-mask``; BERT with a bool key-padding mask; T5 with
an additive mask, which holds the learned relative position bias, requiring grad, with
``position_embedding_type`` "relative"), or, with context parallelism, the ring of
:mod:`megalite.parallel.context_parallel`, which keeps only a log-sum-exp per row (never the
scores). The fused SDPA kernels keep a log-sum-exp too; torch's math backend keeps the scores.
Which backend torch 2.13 picks (:func:`scores_stored_because`):

* CPU: its flash kernel (any dtype, masks, grouped-query heads), except with attention dropout
  or a mask that requires grad (T5's relative bias), which take the math backend (checked
  against ``torch._fused_sdp_choice`` in tests/unit/test_activation_estimate.py).
* CUDA (sm80 and later): flash without a mask in bf16/fp16 (head dim <= 256, dropout and
  grouped-query heads supported), else the memory-efficient kernel (masks, also requiring
  grad, dropout, fp32; head dim a multiple of 8 in bf16/fp16, of 4 in fp32), which refused
  grouped-query heads on torch 2.11 (BENCHMARKS.md, "GPU check"), so that case is counted;
  cuDNN's kernel, preferred on H100/H200, only adds fused cases.

The device is the one a run started here would train on (CUDA when available, as the trainer
chooses), or the ``device`` argument. With attention dropout on CPU and packed documents the
math backend keeps each document's square, at most s x s: the whole term is counted.

Encoder-decoders: encoder layers at the encoder length t_e, decoder layers at the decoder
length t_d plus their cross-attention, by the same accounting: its norm input, query input and
dropout mask ``5*t_d*b*h`` (divided by t with SP), queries and output-projection input
``4*t_d*b*h/t``, keys and values ``4*t_e*b*h/t`` and the scores ``5*a*t_d*t_e*b/t`` (dropped
by selective recompute, and where the kernel keeps no scores: the rule above, with the
source padding mask, which does not require grad); the encoder output they read, and T5's
additive self-attention masks ([b, a/t, s, s] once per stack, not per layer), are not counted.
"""
from __future__ import annotations

__all__ = ["activation_bytes_per_layer", "encoder_decoder_activation_bytes",
           "scores_stored_because", "attention_scores_note"]


def _device(device: str | None) -> str:
    if device is not None:
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _attention_kinds(config) -> dict[str, tuple[bool, bool]]:
    """The training attentions of ``config``'s family: name -> (has a mask, the mask requires
    grad). GPT's packed documents call SDPA per document without a mask."""
    m = config.model
    if m.is_encoder_decoder:    # the T5 data always gives padding masks
        return {"self-attention": (True, m.position_embedding_type == "relative"),
                "cross-attention": (True, False)}
    return {"attention": (m.model_type == "bert", False)}


def scores_stored_because(config, device: str | None = None, *, mask: bool = False,
                          mask_grad: bool = False) -> str | None:
    """Why an SDPA call of ``config`` on ``device`` ("cpu"/"cuda"; None: this process's)
    runs torch's math backend, which keeps the s x s scores for backward, or None when a fused
    kernel runs (module doc). ``mask``: an ``attn_mask`` is passed; ``mask_grad``: it
    requires grad."""
    m, prec = config.model, config.precision
    if _device(device) == "cpu":
        if m.attention_dropout > 0:
            return f"attention dropout {m.attention_dropout:g} on cpu"
        return "learned position bias on cpu" if mask_grad else None
    half = prec.bf16 or prec.fp16
    d = m.head_dim
    if not mask and half and d <= 256:
        return None                                             # flash
    gqa = m.query_groups != m.num_attention_heads
    if d % (8 if half else 4) == 0 and not gqa:
        return None                                             # memory-efficient
    why = ["grouped-query heads" if gqa else f"head dim {d}",
           "a mask" if mask else "" if half else "fp32"]
    return " with ".join(w for w in why if w) + " on cuda"


def _stored(config, device: str | None, kind: str) -> bool:
    m = config.model
    if m.recompute_granularity is not None or config.parallel.context_parallel_size > 1:
        return False
    mask, grad = _attention_kinds(config)[kind]
    return scores_stored_because(config, device, mask=mask, mask_grad=grad) is not None


def attention_scores_note(config, device: str | None = None) -> str:
    """A few words on whether the estimate counts the s x s scores, and why (the plan prints
    it), e.g. "attention scores not stored: fused SDPA on cuda"."""
    m = config.model
    if m.recompute_granularity is not None:
        return f"attention scores not stored: {m.recompute_granularity} recompute"
    if config.parallel.context_parallel_size > 1:
        return "attention scores not stored: ring attention"
    dev = _device(device)
    parts = []
    for kind, (mask, grad) in _attention_kinds(config).items():
        why = scores_stored_because(config, dev, mask=mask, mask_grad=grad)
        parts.append(f"{kind} scores counted: SDPA math backend ({why})" if why else
                     f"{kind} scores not stored: fused SDPA on {dev}")
    return "; ".join(parts)


def _layer_bytes(config, tp: int, s: int, scores: bool) -> float:
    """Bytes of one self-attention layer over ``s`` tokens (module doc); ``scores``: count
    the s x s score matrix."""
    m = config.model
    b, h, a = config.training.micro_batch_size, m.hidden_size, m.num_attention_heads
    sp = config.parallel.sequence_parallel
    scale = 1.0 if (config.precision.bf16 or config.precision.fp16) else 2.0
    if m.recompute_granularity == "full":
        return 2 * s * b * h / (tp if sp else 1) * scale
    attn = 5 * a * s / h if scores else 0.0
    per = 34 / tp + attn / tp if sp else 10 + 24 / tp + attn / tp
    return s * b * h * per * scale


def activation_bytes_per_layer(config, tp: int, device: str | None = None) -> float:
    """Activation bytes of one transformer layer for one microbatch of ``config`` (a
    :class:`~megalite.config.TrainConfig`) at tensor-parallel size ``tp``, training on
    ``device`` (None: this process's; module doc)."""
    return _layer_bytes(config, tp, config.model.training_seq_length,
                        _stored(config, device, "attention"))


def encoder_decoder_activation_bytes(config, tp: int, device: str | None = None) -> float:
    """An encoder-decoder's activation bytes of all its layers for one microbatch, per encoder
    layer (the dry run counts ``num_layers`` layers in flight): module doc."""
    m = config.model
    enc, dec = m.training_seq_length, m.decoder_seq_length or m.training_seq_length
    b, h, a = config.training.micro_batch_size, m.hidden_size, m.num_attention_heads
    sp = config.parallel.sequence_parallel
    scale = 1.0 if (config.precision.bf16 or config.precision.fp16) else 2.0
    self_scores = _stored(config, device, "self-attention")
    cross = 0.0
    if m.recompute_granularity != "full":
        cross = (dec * b * h * (5 / tp if sp else 5) + 4 * dec * b * h / tp
                 + 4 * enc * b * h / tp) * scale
        if _stored(config, device, "cross-attention"):
            cross += 5 * a * dec * enc * b / tp * scale
    total = (m.num_layers * _layer_bytes(config, tp, enc, self_scores)
             + m.decoder_layers * (_layer_bytes(config, tp, dec, self_scores) + cross))
    return total / m.num_layers
