"""Model FLOPs per training iteration (used for TFLOP/s and MFU), the formula of each model
family (:mod:`megalite.families` names them; GPT's is derived here).

Derivation. Notation: B sequences per iteration (global batch), s tokens per sequence, L layers,
h hidden size, a query heads, g key/value groups, d head width, f MLP inner width, V vocabulary
(unpadded: the padding rows are not useful work). A GEMM of [m, k] x [k, n] costs 2*m*k*n FLOPs
(one multiply and one add per term). Per token and per layer, the forward pass runs:

====================  ===================  ===================================================
GEMM                  FLOPs per token      note
====================  ===================  ===================================================
QKV projection        2 * h * (a + 2g) * d  GQA-aware: g key and g value heads
scores Q K^T          a * d * s             2*a*d*s for the full s x s matrix, halved: causal
probs x V             a * d * s             idem (only the lower triangle is useful work)
output projection     2 * a * d * h
MLP                   2 * m * h * f         m = 2 for GELU (up, down), 3 for SwiGLU (gate, up,
                                            down)
====================  ===================  ===================================================

plus the output layer (logits), 2 * h * V per token. Each GEMM runs three times per iteration:
forward, gradient w.r.t. its input (dgrad) and w.r.t. its weight (wgrad; for the two attention
batched matmuls the second "weight" is the other activation) -- hence the factor 3:

    flops = 3 * B * s * ( L * [2h(a+2g)d + 2ads + 2adh + 2mhf] + 2hV )

Encoder-decoder models (model_type "t5", t source and s target tokens per sample; L_e
encoder and L_d decoder layers): encoder layers as above with t for s and the full t x t
score matrix (4adt: bidirectional, nothing halved); decoder layers as above (causal over s)
plus the cross-attention, per target token 2had (queries) + 4adt (scores and probs x V over
the t source keys) + 2adh (output), and per *source* token and decoder layer 2h(2g)d for its
keys and values; the output layer on the s target tokens:

    flops = 3 * B * ( t * L_e * [2h(a+2g)d + 4adt + 2adh + 2mhf] + t * L_d * 4hgd
                    + s * ( L_d * [2h(a+2g)d + 2ads + 2adh + 2had + 4adt + 2adh + 2mhf]
                            + 2hV ) )

Mixture-of-experts layers (``num_experts`` E, top-k, expert width f_e, shared experts of
width f_s): only the *active* parameters count, each token's k experts and the shared ones,
so the MLP term 2mhf becomes 2mh(k f_e + f_s), plus the router's 2hE (and 2h for a shared
expert gate); dropped assignments (capacity factor) are counted as if computed.
Not counted: activation recompute (these are *model* FLOPs, the MFU convention, not hardware
FLOPs), norms, softmax, activations, RoPE, the embedding lookup and the loss (all O(h) per
token, not GEMMs). For LLaMA-2-7B at s=4096 this is the familiar 6*N_dense + 6*L*s*h per token.

BERT: the attention is bidirectional, so the scores and probs x V GEMMs do the whole s x s
matrix (4*a*d*s per token, not 2*a*d*s); the masked-LM head adds its transform (2*h*h) to
the output layer's 2*h*V on every token (the logits of all positions are computed, as in
Megatron-LM and Hugging Face), and the pooler and binary head 2*h*h + 2*h*2 per sequence:

    flops = 3 * B * s * ( L * [2h(a+2g)d + 4ads + 2adh + 2mhf] + 2hh + 2hV ) + 3 * B * (2hh + 4h)
"""
from __future__ import annotations

from typing import Callable

from megalite.errors import MegaliteError
from megalite.model.config import GATED_ACTIVATIONS, TransformerConfig


__all__ = ["gpt_forward_flops_per_token", "bert_forward_flops_per_token",
           "t5_forward_flops_per_token", "encoder_decoder_forward_flops", "flops_per_iteration"]


def _layer_flops(config: TransformerConfig, score_flops: int) -> int:
    """Forward GEMM FLOPs of one self-attention layer for one token, ``score_flops`` being its
    Q K^T and P V part."""
    h, a, g = config.hidden_size, config.num_attention_heads, config.query_groups
    d, f = config.head_dim, config.ffn_size
    mlp_mats = 3 if config.activation in GATED_ACTIVATIONS else 2
    return (2 * h * (a + 2 * g) * d           # QKV projection
            + score_flops
            + 2 * a * d * h                   # attention output projection
            + 2 * mlp_mats * h * f)           # MLP


def _moe_correction(config: TransformerConfig) -> int:
    """Forward FLOPs per token an MoE layer adds to :func:`_layer_flops` (module doc): the
    active experts and shared experts instead of the dense MLP, plus the router."""
    h, e = config.hidden_size, config.num_experts
    mats = 3 if config.activation in GATED_ACTIVATIONS else 2
    active = config.moe_router_topk * config.moe_ffn_size + (
        config.moe_shared_expert_intermediate_size or 0)
    gate = 2 * h if config.moe_shared_expert_gate else 0
    return 2 * mats * h * (active - config.ffn_size) + 2 * h * e + gate


def _layers_flops_per_token(config: TransformerConfig, seq_length: int, causal: bool) -> float:
    """Forward GEMM FLOPs of the L transformer layers for one token (see module doc)."""
    a, d = config.num_attention_heads, config.head_dim
    # Q K^T and P V: 4*a*d*s for the whole s x s matrix, half of it causal
    dense = config.num_layers * _layer_flops(config, (2 if causal else 4) * a * d * seq_length)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    return float(dense + moe_layers * (_moe_correction(config) if moe_layers else 0))


def gpt_forward_flops_per_token(config: TransformerConfig, seq_length: int) -> float:
    """GPT's forward GEMM FLOPs for one token of a length-``seq_length`` sequence (see module
    doc)."""
    return _layers_flops_per_token(config, seq_length, causal=True) \
        + 2.0 * config.hidden_size * config.vocab_size


def bert_forward_flops_per_token(config: TransformerConfig, seq_length: int) -> float:
    """BERT's forward GEMM FLOPs per token of a length-``seq_length`` sequence, the per-sequence
    pooler and binary head spread over its tokens (see module doc)."""
    h = config.hidden_size
    heads = 2.0 * h * h + 2.0 * h * config.vocab_size
    if config.bert_binary_head:
        heads += (2.0 * h * h + 4.0 * h) / seq_length
    return _layers_flops_per_token(config, seq_length, causal=False) + heads


def encoder_decoder_forward_flops(config: TransformerConfig, source: int, target: int) -> int:
    """Forward GEMM FLOPs of one encoder-decoder sample of ``source`` encoder and ``target``
    decoder tokens (module doc)."""
    h, a, g, d = config.hidden_size, config.num_attention_heads, config.query_groups, config.head_dim
    encoder = source * config.num_layers * _layer_flops(config, 4 * a * d * source)
    cross_kv = source * config.decoder_layers * 4 * h * g * d
    cross = 2 * h * a * d + 4 * a * d * source + 2 * a * d * h
    decoder = target * (config.decoder_layers * (_layer_flops(config, 2 * a * d * target) + cross)
                        + 2 * h * config.vocab_size)
    return encoder + cross_kv + decoder


def t5_forward_flops_per_token(config: TransformerConfig, seq_length: int) -> float:
    """An encoder-decoder's forward GEMM FLOPs per encoder token: one sample of ``seq_length``
    encoder and ``config.decoder_seq_length`` decoder tokens, spread over its encoder tokens."""
    if not config.decoder_seq_length:
        raise MegaliteError("the encoder-decoder's FLOPs need its decoder_seq_length "
                            "(--decoder-seq-length)")
    return encoder_decoder_forward_flops(config, seq_length, config.decoder_seq_length) \
        / seq_length


def flops_per_iteration(config: TransformerConfig, global_batch_size: int, seq_length: int,
                        forward_flops_per_token: Callable[[TransformerConfig, int], float]
                        | None = None) -> float:
    """Model FLOPs of one training iteration (forward + dgrad + wgrad) over the global batch:
    ``3 * B * s * forward_flops_per_token(config, s)``, by default GPT's formula (the family
    registry passes each family's: ``family_of(config).flops_per_iteration``)."""
    if forward_flops_per_token is None:
        if config.model_type != "gpt":
            raise MegaliteError(f"flops_per_iteration: GPT's formula does not fit a "
                                f"{config.model_type} model (use megalite.families."
                                f"family_of(config).flops_per_iteration)")
        forward_flops_per_token = gpt_forward_flops_per_token
    if global_batch_size < 1 or seq_length < 1:
        raise MegaliteError(f"flops_per_iteration: global_batch_size={global_batch_size} and "
                            f"seq_length={seq_length} must be >= 1")
    return 3.0 * global_batch_size * seq_length * forward_flops_per_token(config, seq_length)
