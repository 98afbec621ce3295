"""Typed configuration of a Transformer model: :class:`TransformerConfig`, the one config
class of every model family (``model_type``: GPT with both recipes, BERT, T5 and the original
Transformer of ``torch.nn.Transformer`` as switches of the encoder-decoder; what else differs by
family is :mod:`megalite.families`).

The *classic* recipe (GPT-2 style): learned or sinusoidal absolute positions, LayerNorm, GELU,
biases, output layer tied to the word embedding. The *LLaMA* recipe: rotary positions, RMSNorm,
SwiGLU, grouped-query attention, no biases, untied output layer. Every combination of the switches
below is a valid model; the presets in :mod:`megalite.model.presets` name the common ones.

Field names follow Megatron's arguments where one exists (``num_query_groups``,
``ffn_hidden_size``, ``kv_channels``, ``make_vocab_size_divisible_by``, ...), so flags map 1:1.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megalite.errors import MegaliteError
from megalite.model import moe_config

MODEL_TYPES = ("gpt", "bert", "t5")
NORM_PLACEMENTS = ("pre", "post")
POSITION_EMBEDDING_TYPES = ("rope", "learned_absolute", "sinusoidal", "relative")
ROPE_SCALINGS = ("llama3", "linear")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
# "gelu" is the exact (erf) GELU; "gelu_tanh" its tanh approximation (what GPT-2 checkpoints
# were trained with, HF's "gelu_new"); "swiglu" is silu(x W_gate) * (x W_up); "geglu" is
# gelu_tanh(x W_gate) * (x W_up) (T5 v1.1's "gated-gelu"); "relu" (T5 v1.0, nn.Transformer).
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "relu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """The vocabulary size rounded up to a multiple of ``multiple * tp_size`` (as Megatron does).

    Every tensor-parallel rank then holds an equal slice of ``padded / tp_size`` rows whose
    size is a multiple of ``multiple`` (good GEMM shapes). The extra rows are never predicted:
    the model masks their logits (see :class:`megalite.model.gpt.GPTModel`).
    """
    if vocab_size < 1 or tp_size < 1 or multiple < 1:
        raise MegaliteError(f"padded_vocab_size: vocab_size={vocab_size}, tp_size={tp_size} and "
                            f"multiple={multiple} must all be >= 1")
    step = multiple * tp_size
    return -(-vocab_size // step) * step


@dataclass
class TransformerConfig:
    """Shapes, recipe switches and regularisation of one model (of any family).

    Derived quantities (``head_dim``, ``ffn_size``, ``query_groups``) are properties so the
    stored config stays exactly what the user asked for.
    """

    num_layers: int
    """Number of transformer layers (blocks); the encoder's for model_type "t5"."""
    hidden_size: int
    """Width of the residual stream, h."""
    num_attention_heads: int
    """Number of query heads."""
    vocab_size: int
    """Vocabulary size of the tokenizer (unpadded; the model pads it, see padded_vocab_size)."""
    num_query_groups: int | None = None
    """Number of key/value heads for grouped-query attention; None means num_attention_heads
    (plain multi-head attention). Must divide num_attention_heads."""
    ffn_hidden_size: int | None = None
    """Inner width of the MLP; None means 4 * hidden_size. For swiglu this is the width of each
    of the gate and up projections (LLaMA-2-7B: 11008)."""
    kv_channels: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 1024
    """Longest sequence the position embedding supports (rows of the learned table; the RoPE and
    sinusoidal tables are computed up to this length). No limit with "relative" positions."""
    seq_length: int | None = None
    """Training sequence length; None means max_position_embeddings. Used by FLOPs accounting and
    the trainer; the model itself accepts any length <= max_position_embeddings."""
    position_embedding_type: str = "learned_absolute"
    """One of "rope", "learned_absolute", "sinusoidal", "relative" (T5's bucketed bias added to
    the attention scores, one table per stack; model_type "t5" only)."""
    rotary_base: float = 10000.0
    """Base (theta) of the rotary frequencies: inv_freq_i = base^(-2i/head_dim)."""
    rope_scaling: str | None = None
    """Rotary frequency scaling for a longer context than pretraining used: None, "llama3"
    (Llama 3.1: frequencies whose wavelength exceeds rope_original_max_position_embeddings /
    rope_low_freq_factor are divided by rope_scaling_factor, those shorter than .../
    rope_high_freq_factor are kept, a smooth blend in between) or "linear" (position
    interpolation: every frequency divided by rope_scaling_factor)."""
    rope_scaling_factor: float = 8.0
    """Divisor of the scaled rotary frequencies (Llama 3.1: 8)."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_max / this are fully scaled (Llama 3.1: 1)."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_max / this are kept (Llama 3.1: 4)."""
    rope_original_max_position_embeddings: int = 8192
    """llama3 scaling: the context length of the original pretraining (Llama 3.1: 8192)."""
    normalization: str = "LayerNorm"
    """"LayerNorm" (weight and bias) or "RMSNorm" (weight only)."""
    layernorm_epsilon: float = 1e-5
    """Epsilon added to the variance in every norm."""
    activation: str = "gelu"
    """MLP activation: "gelu", "gelu_tanh" or "swiglu"."""
    add_bias_linear: bool = True
    """Biases on the QKV, attention output and both MLP linears (classic: True, LLaMA: False)."""
    add_qkv_bias: bool = False
    """A bias on the QKV projection even without add_bias_linear (Qwen2: True)."""
    qk_layernorm: bool = False
    """Normalize every query and key head over head_dim (``normalization``, its own weight of
    [head_dim] for q and for k) before the rotary embedding: Megatron-LM's ``--qk-layernorm``,
    Qwen3's q_norm / k_norm. Self-attention only (GPT and BERT models)."""
    untie_embeddings_and_output_weights: bool = False
    """False: logits use the word-embedding matrix (tied, GPT-2). True: a separate output layer."""
    hidden_dropout: float = 0.0
    """Dropout after the embedding and on each residual branch (attention and MLP outputs)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal init of all weight matrices; the attention output and second MLP
    projection use init_method_std / sqrt(2 * num_layers)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the tensor-parallel size."""
    sequence_parallel: bool = False
    """Split norms/dropout/residual activations along the sequence over the tensor-parallel
    ranks (all-gather / reduce-scatter instead of all-reduce). Needs seq % tp == 0."""
    recompute_granularity: str | None = None
    """Activation checkpointing: None, "full" (recompute each layer in backward) or
    "selective" (recompute only the attention core, whose activations grow with s^2)."""
    model_type: str = "gpt"
    """The model family (``--model-type``): "gpt" (decoder-only), "bert" (bidirectional
    encoder with masked-LM and binary heads) or "t5" (encoder-decoder:
    :class:`megalite.model.encoder_decoder.EncoderDecoderModel`); see
    :mod:`megalite.families` for what each family brings (model, loss, data, FLOPs, HF
    converter). Checkpoints saved before the field existed are GPT."""
    norm_placement: str = "pre"
    """Where each layer's norms sit: "pre" (before attention and MLP, residual around them:
    GPT, Megatron's BERT, T5) or "post" (after each residual add: the original BERT, with a norm
    on the embedding and none at the end; the original Transformer, ``torch.nn.Transformer``'s
    default ``norm_first=False``, with a final norm per stack)."""
    bert_binary_head: bool = True
    """BERT: the binary (sentence-order) head on the pooled first token; False is Megatron-LM's
    ``--bert-no-binary-head``."""
    num_tokentypes: int | None = None
    """BERT: rows of the token-type embedding; None is Megatron-LM's rule: 2 with the binary
    head, else none (0)."""
    softmax_scale: float | None = None
    """Multiplier of the attention scores q.k before the softmax; None means 1/sqrt(head_dim).
    T5: 1.0 (its initialization folds the scale into the query weights)."""
    relative_attention_num_buckets: int = 32
    """position_embedding_type "relative" (T5): buckets of the relative position bias (half per
    direction in the encoder; half of each direction's exact, half logarithmic)."""
    relative_attention_max_distance: int = 128
    """position_embedding_type "relative": distances from this on share the last bucket."""
    scale_embedding: bool = False
    """Multiply the word embeddings by sqrt(hidden_size) before positions are added (the
    original Transformer, Vaswani et al. 3.4)."""
    scale_decoder_outputs: bool = False
    """Multiply the final hidden states by hidden_size**-0.5 before the output layer (T5 v1.0,
    tied embeddings; Hugging Face's T5 ``scale_decoder_outputs``)."""
    decoder_num_layers: int | None = None
    """model_type "t5": decoder layers; None means num_layers."""
    decoder_seq_length: int | None = None
    """model_type "t5": decoder (target) tokens per training sample (Megatron-LM's
    ``--decoder-seq-length``); seq_length is the encoder's. Used by the trainer and FLOPs."""
    decoder_start_token_id: int | None = None
    """model_type "t5": the first decoder input when generating; None means the tokenizer's
    [BOS] (what megalite's T5 data starts the decoder with). Hugging Face T5: 0 (its pad)."""
    # ---- mixture of experts (megalite.model.moe; validated in megalite.model.moe_config) ----
    num_experts: int | None = None
    """Experts per MoE layer (``--num-experts``); None: a dense model."""
    moe_router_topk: int = 2
    """Experts each token is routed to, k (``--moe-router-topk``)."""
    moe_ffn_hidden_size: int | None = None
    """Inner width of each expert (``--moe-ffn-hidden-size``); None means ffn_size."""
    moe_layer_freq: int | list[int] = 1
    """Which layers are MoE (``--moe-layer-freq``): N (layer i is MoE when i % N == 0) or a
    list of 0/1 per layer (1: MoE)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Width of the shared expert(s) every token also goes through; None: none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x . w) per token (Qwen2-MoE)."""
    moe_router_load_balancing_type: str = "aux_loss"
    """"aux_loss", "seq_aux_loss" or "none" (megalite.model.router)."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing loss (0: off)."""
    moe_z_loss_coeff: float | None = None
    """Coefficient of the router z-loss (None: off)."""
    moe_router_pre_softmax: bool = False
    """Weights = the softmax scores of the selected experts as they are; False: renormalised
    over the top k (Mixtral, Qwen3-MoE's norm_topk_prob)."""
    moe_expert_capacity_factor: float | None = None
    """Drop assignments beyond ceil(factor * T * k / E) per expert; None: dropless."""

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def query_groups(self) -> int:
        """Number of key/value heads (num_query_groups or, if unset, the number of heads)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head width (kv_channels or hidden_size // num_attention_heads)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """MLP inner width (ffn_hidden_size or 4 * hidden_size)."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def moe_ffn_size(self) -> int:
        """Inner width of each expert (moe_ffn_hidden_size or ffn_size)."""
        return self.moe_ffn_hidden_size or self.ffn_size

    def is_moe_layer(self, i: int) -> bool:
        """True when layer ``i`` (0-based) has experts instead of the dense MLP."""
        return moe_config.is_moe_layer(self, i)

    @property
    def training_seq_length(self) -> int:
        """seq_length or, if unset, max_position_embeddings."""
        return self.seq_length or self.max_position_embeddings

    @property
    def decoder_layers(self) -> int:
        """Decoder layers of an encoder-decoder model (decoder_num_layers or num_layers)."""
        return self.decoder_num_layers or self.num_layers

    @property
    def is_encoder_decoder(self) -> bool:
        """True for the encoder-decoder family (model_type "t5")."""
        return self.model_type == "t5"

    @property
    def tokentypes(self) -> int:
        """Rows of the token-type embedding (num_tokentypes, or Megatron's rule; 0: none)."""
        if self.model_type != "bert":
            return 0
        if self.num_tokentypes is not None:
            return self.num_tokentypes
        return 2 if self.bert_binary_head else 0

    @property
    def tied_embeddings(self) -> bool:
        """True when the output layer reuses the word-embedding matrix."""
        return not self.untie_embeddings_and_output_weights

    def padded_vocab(self, tp_size: int) -> int:
        """Padded vocabulary size for this tensor-parallel size."""
        return padded_vocab_size(self.vocab_size, tp_size, self.make_vocab_size_divisible_by)

    def replace(self, **changes) -> "TransformerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise MegaliteError naming the field when the config is inconsistent."""
        def bad(msg: str) -> None:
            raise MegaliteError(f"model config: {msg}")

        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_query_groups", "ffn_hidden_size", "kv_channels", "seq_length",
                     "decoder_num_layers", "decoder_seq_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                bad(f"{name} must be a positive integer or None, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            bad(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.norm_placement not in NORM_PLACEMENTS:
            bad(f"norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        if self.model_type == "gpt" and self.norm_placement != "pre":
            bad("norm_placement 'post' is for BERT and the encoder-decoder (model_type bert, "
                "t5); GPT models are pre-norm")
        t = self.num_tokentypes
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
            bad(f"num_tokentypes must be an integer >= 0 or None, got {t!r}")
        if t and self.model_type != "bert":
            bad(f"num_tokentypes={t}: token types are for BERT (model_type bert)")
        if self.model_type == "bert" and (self.activation not in ("gelu", "gelu_tanh") or
                                          self.position_embedding_type != "learned_absolute"):
            bad("a BERT model has learned absolute positions and a gelu MLP (got "
                f"position_embedding_type={self.position_embedding_type!r}, "
                f"activation={self.activation!r})")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            bad(f"position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, "
                f"got {self.position_embedding_type!r}")
        if self.normalization not in NORMALIZATIONS:
            bad(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.activation not in ACTIVATIONS:
            bad(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        self._validate_encoder_decoder(bad)
        if self.qk_layernorm and self.is_encoder_decoder:
            bad("qk_layernorm: the encoder-decoder's cross-attention has no query/key norms "
                "(GPT and BERT models only)")
        moe_config.validate(self, bad)
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            bad(f"recompute_granularity must be one of {RECOMPUTE_GRANULARITIES}, "
                f"got {self.recompute_granularity!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            bad(f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} (or set kv_channels)")
        if self.num_attention_heads % self.query_groups:
            bad(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.query_groups}")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            bad(f"rope needs an even head dimension, got {self.head_dim}")
        if self.position_embedding_type == "sinusoidal" and self.hidden_size % 2:
            bad(f"sinusoidal positions need an even hidden_size, got {self.hidden_size}")
        if (self.seq_length is not None and self.position_embedding_type != "relative"
                and self.seq_length > self.max_position_embeddings):
            bad(f"seq_length={self.seq_length} exceeds max_position_embeddings="
                f"{self.max_position_embeddings}")
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                bad(f"{name} must be in [0, 1), got {p!r}")
        if not self.init_method_std > 0:
            bad(f"init_method_std must be > 0, got {self.init_method_std!r}")
        if not self.layernorm_epsilon > 0:
            bad(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon!r}")
        if not self.rotary_base > 0:
            bad(f"rotary_base must be > 0, got {self.rotary_base!r}")
        if self.rope_scaling is not None:
            if self.rope_scaling not in ROPE_SCALINGS:
                bad(f"rope_scaling must be None or one of {ROPE_SCALINGS}, got "
                    f"{self.rope_scaling!r}")
            if self.position_embedding_type != "rope":
                bad(f"rope_scaling={self.rope_scaling!r} needs position_embedding_type "
                    f"'rope', got {self.position_embedding_type!r}")
            if not self.rope_scaling_factor > 0:
                bad(f"rope_scaling_factor must be > 0, got {self.rope_scaling_factor!r}")
            if self.rope_scaling == "llama3" and not (
                    0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
                bad(f"llama3 rope scaling needs 0 < rope_low_freq_factor < "
                    f"rope_high_freq_factor, got {self.rope_low_freq_factor!r} and "
                    f"{self.rope_high_freq_factor!r}")
            o = self.rope_original_max_position_embeddings
            if not isinstance(o, int) or isinstance(o, bool) or o < 1:
                bad(f"rope_original_max_position_embeddings must be a positive integer, "
                    f"got {o!r}")

    def _validate_encoder_decoder(self, bad) -> None:
        """The fields of the encoder-decoder family and of relative positions."""
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            bad(f"softmax_scale must be > 0 or None, got {self.softmax_scale!r}")
        for name in ("relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 4:
                bad(f"{name} must be an integer >= 4, got {value!r}")
        if self.position_embedding_type == "relative" and not self.is_encoder_decoder:
            bad("position_embedding_type 'relative' (T5's bias) needs model_type 't5'")
        if not self.is_encoder_decoder:
            for name in ("decoder_num_layers", "decoder_seq_length", "decoder_start_token_id"):
                if getattr(self, name) is not None:
                    bad(f"{name} is for model_type 't5', got model_type {self.model_type!r}")
        start = self.decoder_start_token_id
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)
                                  or not 0 <= start < self.vocab_size):
            bad(f"decoder_start_token_id must be an id in [0, vocab_size={self.vocab_size}), "
                f"got {start!r}")
        if (self.decoder_seq_length is not None and self.position_embedding_type != "relative"
                and self.decoder_seq_length > self.max_position_embeddings):
            bad(f"decoder_seq_length={self.decoder_seq_length} exceeds "
                f"max_position_embeddings={self.max_position_embeddings}")

    def validate_parallel(self, tp_size: int, seq_length: int | None = None) -> None:
        """Raise MegaliteError when this model cannot be split over ``tp_size`` ranks.

        Heads and key/value groups are split across ranks (each rank owns whole heads and the
        groups they read), the MLP inner width is split, and with sequence parallelism the
        sequence must split evenly.
        """
        def bad(msg: str) -> None:
            raise MegaliteError(f"model config with --tensor-model-parallel-size {tp_size}: {msg}")

        if self.num_attention_heads % tp_size:
            bad(f"num_attention_heads={self.num_attention_heads} is not divisible by {tp_size}")
        if self.query_groups % tp_size:
            bad(f"num_query_groups={self.query_groups} is not divisible by {tp_size}")
        if self.ffn_size % tp_size:
            bad(f"ffn_hidden_size={self.ffn_size} is not divisible by {tp_size}")
        moe_config.validate_parallel(self, tp_size, bad)
        if self.sequence_parallel and seq_length is not None and seq_length % tp_size:
            bad(f"--sequence-parallel needs the sequence length ({seq_length}) divisible by "
                f"{tp_size}")
