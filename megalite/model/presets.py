"""Named model shapes: ``get_preset(name) -> TransformerConfig``.

=============  ======================================================================  ==========
name           shape                                                                   parameters
=============  ======================================================================  ==========
tiny           classic, 2 layers, h=64, 4 heads, vocab 1000, 128 learned positions     ~0.2M
tiny-llama     LLaMA recipe, 2 layers, h=64, 4 heads / 2 kv groups, vocab 1000         ~0.2M
gpt2-small     GPT-2 124M: 12 layers, h=768, 12 heads, vocab 50257, 1024 positions     124,439,808
1b             LLaMA recipe with TinyLlama-1.1B shapes: 22 layers, h=2048, 32 heads,   1,100,048,384
               4 kv groups, ffn 5632, vocab 32000, 2048 positions
llama2-7b      exactly LLaMA-2-7B: 32 layers, h=4096, 32 heads, ffn 11008, vocab 32000 6,738,415,616
llama3.1-8b    exactly Llama-3.1-8B: 32 layers, h=4096, 32 heads / 8 kv groups, ffn   8,030,261,248
               14336, vocab 128256, theta 500000, llama3 rope scaling x8, 131072 positions
mixtral-8x7b   exactly Mixtral-8x7B: 32 layers, h=4096, 32 heads / 8 kv groups, 8     46,702,792,704
               experts of ffn 14336, top-2, vocab 32000, theta 1e6, 32768 positions   (12,879,925,248
                                                                                       active)
tiny-moe       LLaMA recipe with Qwen-MoE-style layers: 2 layers, h=64, 8 experts of   ~0.2M
               width 32, top-4, a gated shared expert of width 64, vocab 1000
qwen3-moe-     exactly a small ``Qwen3MoeForCausalLM``: 3 layers (the middle one       425,600
tiny           dense: ``mlp_only_layers=[1]``), h=64, 4 heads / 2 kv groups of         (278,144
               width 32, query/key norms, 16 experts of width 32, top-4                active)
               renormalised, dense ffn 128, vocab 1000, theta 1e6, eps 1e-6
qwen3-30b-a3b  exactly Qwen3-30B-A3B: 48 layers, h=2048, 32 heads / 4 kv groups of     30,532,122,624
               width 128, query/key norms, 128 experts of width 768, top-8             (3,353,032,704
               renormalised, vocab 151936, theta 1e6, 40960 positions                  active)
tiny-bert      BERT, pre-norm (Megatron's), 2 layers, h=64, 4 heads, vocab 1000, 128     ~0.2M
               positions, binary head
bert-base      exactly BERT-Base (post-norm, as ``BertForPreTraining`` of bert-base-       110,106,428
               uncased): 12 layers, h=768, 12 heads, ffn 3072, vocab 30522, 512 positions
bert-large     exactly BERT-Large: 24 layers, h=1024, 16 heads, ffn 4096, vocab 30522     336,226,108
tiny-t5        T5 v1.1 recipe (gated GELU, untied), 2 + 2 layers, h=64, 4 heads,       ~0.3M
               ffn 128, vocab 1000
t5-small       exactly T5 (v1.0) small: 6 + 6 layers, h=512, 8 heads, ffn 2048, vocab   60,506,624
               32128, ReLU, relative position buckets 32 / 128, tied and scaled output
t5-base        exactly T5 (v1.0) base: 12 + 12 layers, h=768, 12 heads, ffn 3072,       222,903,552
               vocab 32128
transformer-   the original Transformer's base model (Vaswani et al. 2017) as torch's   63,084,544
base           nn.Transformer builds it: 6 + 6 post-norm layers, h=512, 8 heads, ffn
               2048, ReLU, sinusoidal positions, embeddings x sqrt(h) tied with the
               output layer, shared vocabulary of 37000
=============  ======================================================================  ==========

The T5 counts are ``T5ForConditionalGeneration``'s (its encoder and decoder embeddings and
output layer are one matrix); the Transformer's is ``nn.Transformer`` plus one embedding.

Parameter counts use the unpadded vocabulary (what the Hugging Face model holds); the megalite
model adds ``padded_vocab - vocab`` rows to the embedding (and untied output layer), which is
zero for vocab 32000 at tensor-parallel sizes 1, 2 (32000 = 250 * 128) and nonzero from 4 on
(vocab 128256 = 1002 * 128: zero at TP 1 and 2).
"""
from __future__ import annotations

from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig


def _classic(**kw) -> TransformerConfig:
    base = dict(position_embedding_type="learned_absolute", normalization="LayerNorm",
                activation="gelu", add_bias_linear=True, untie_embeddings_and_output_weights=False,
                layernorm_epsilon=1e-5)
    base.update(kw)
    return TransformerConfig(**base)


def _llama(**kw) -> TransformerConfig:
    base = dict(position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                add_bias_linear=False, untie_embeddings_and_output_weights=True,
                layernorm_epsilon=1e-5, rotary_base=10000.0)
    base.update(kw)
    return TransformerConfig(**base)


def _bert(**kw) -> TransformerConfig:
    base = dict(model_type="bert", position_embedding_type="learned_absolute",
                normalization="LayerNorm", activation="gelu", add_bias_linear=True,
                untie_embeddings_and_output_weights=False, layernorm_epsilon=1e-12,
                bert_binary_head=True)
    base.update(kw)
    return TransformerConfig(**base)


def _t5(**kw) -> TransformerConfig:
    """T5 v1.0: RMSNorm without mean (eps 1e-6), ReLU, no biases, relative position buckets,
    unscaled attention scores, tied output layer fed h^-0.5 times the decoder output."""
    base = dict(model_type="t5", position_embedding_type="relative", normalization="RMSNorm",
                layernorm_epsilon=1e-6, activation="relu", add_bias_linear=False,
                softmax_scale=1.0, untie_embeddings_and_output_weights=False,
                scale_decoder_outputs=True, max_position_embeddings=512)
    base.update(kw)
    return TransformerConfig(**base)


_BUILDERS = {
    "tiny": lambda: _classic(num_layers=2, hidden_size=64, num_attention_heads=4,
                             vocab_size=1000, max_position_embeddings=128, seq_length=64),
    "tiny-llama": lambda: _llama(num_layers=2, hidden_size=64, num_attention_heads=4,
                                 num_query_groups=2, ffn_hidden_size=176, vocab_size=1000,
                                 max_position_embeddings=128, seq_length=64),
    # GPT-2 checkpoints were trained with the tanh approximation of GELU (HF "gelu_new").
    "gpt2-small": lambda: _classic(num_layers=12, hidden_size=768, num_attention_heads=12,
                                   vocab_size=50257, max_position_embeddings=1024,
                                   activation="gelu_tanh"),
    "1b": lambda: _llama(num_layers=22, hidden_size=2048, num_attention_heads=32,
                         num_query_groups=4, ffn_hidden_size=5632, vocab_size=32000,
                         max_position_embeddings=2048),
    "llama2-7b": lambda: _llama(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                ffn_hidden_size=11008, vocab_size=32000,
                                max_position_embeddings=4096),
    "llama3.1-8b": lambda: _llama(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                  num_query_groups=8, ffn_hidden_size=14336, vocab_size=128256,
                                  max_position_embeddings=131072, rotary_base=500000.0,
                                  rope_scaling="llama3", rope_scaling_factor=8.0,
                                  rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                  rope_original_max_position_embeddings=8192),
    # Mixtral 8x7B (MixtralForCausalLM): 8 experts of SwiGLU width 14336, top-2, renormalised
    "mixtral-8x7b": lambda: _llama(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                   num_query_groups=8, ffn_hidden_size=14336, vocab_size=32000,
                                   max_position_embeddings=32768, rotary_base=1e6,
                                   num_experts=8, moe_router_topk=2),
    # a small MoE of Qwen-MoE shape: many narrow experts, top-4, shared expert with its gate
    "tiny-moe": lambda: _llama(num_layers=2, hidden_size=64, num_attention_heads=4,
                               num_query_groups=2, ffn_hidden_size=128, vocab_size=1000,
                               max_position_embeddings=128, seq_length=64, num_experts=8,
                               moe_router_topk=4, moe_ffn_hidden_size=32,
                               moe_shared_expert_intermediate_size=64,
                               moe_shared_expert_gate=True, moe_aux_loss_coeff=1e-3),
    # Qwen3-MoE (Qwen3MoeForCausalLM): query/key norms, head width above h / heads, many
    # narrow experts renormalised over the top k, no shared expert, RMSNorm eps 1e-6
    "qwen3-moe-tiny": lambda: _llama(num_layers=3, hidden_size=64, num_attention_heads=4,
                                     num_query_groups=2, kv_channels=32, ffn_hidden_size=128,
                                     vocab_size=1000, max_position_embeddings=128,
                                     seq_length=64, rotary_base=1e6, layernorm_epsilon=1e-6,
                                     qk_layernorm=True, num_experts=16, moe_router_topk=4,
                                     moe_ffn_hidden_size=32, moe_layer_freq=[1, 0, 1],
                                     moe_aux_loss_coeff=1e-3),
    "qwen3-30b-a3b": lambda: _llama(num_layers=48, hidden_size=2048, num_attention_heads=32,
                                    num_query_groups=4, kv_channels=128, ffn_hidden_size=6144,
                                    vocab_size=151936, max_position_embeddings=40960,
                                    rotary_base=1e6, layernorm_epsilon=1e-6, qk_layernorm=True,
                                    num_experts=128, moe_router_topk=8,
                                    moe_ffn_hidden_size=768, moe_aux_loss_coeff=1e-3),
    "tiny-bert": lambda: _bert(num_layers=2, hidden_size=64, num_attention_heads=4,
                               vocab_size=1000, max_position_embeddings=128, seq_length=64,
                               norm_placement="pre", layernorm_epsilon=1e-5),
    "bert-base": lambda: _bert(num_layers=12, hidden_size=768, num_attention_heads=12,
                               vocab_size=30522, max_position_embeddings=512,
                               norm_placement="post"),
    "bert-large": lambda: _bert(num_layers=24, hidden_size=1024, num_attention_heads=16,
                                vocab_size=30522, max_position_embeddings=512,
                                norm_placement="post"),
    # T5 v1.1 differs from v1.0 by the gated GELU and an untied, unscaled output layer.
    "tiny-t5": lambda: _t5(num_layers=2, hidden_size=64, num_attention_heads=4,
                           ffn_hidden_size=128, vocab_size=1000, activation="geglu",
                           untie_embeddings_and_output_weights=True,
                           scale_decoder_outputs=False, seq_length=64, decoder_seq_length=32),
    # Training lengths of Megatron-LM's T5 examples: 512 encoder, 128 decoder tokens.
    "t5-small": lambda: _t5(num_layers=6, hidden_size=512, num_attention_heads=8,
                            ffn_hidden_size=2048, vocab_size=32128, seq_length=512,
                            decoder_seq_length=128),
    "t5-base": lambda: _t5(num_layers=12, hidden_size=768, num_attention_heads=12,
                           ffn_hidden_size=3072, vocab_size=32128, seq_length=512,
                           decoder_seq_length=128),
    "transformer-base": lambda: TransformerConfig(
        model_type="t5", num_layers=6, hidden_size=512, num_attention_heads=8,
        ffn_hidden_size=2048, vocab_size=37000, position_embedding_type="sinusoidal",
        normalization="LayerNorm", norm_placement="post", activation="relu",
        scale_embedding=True, max_position_embeddings=1024, seq_length=256,
        decoder_seq_length=256),
}

PRESETS: list[str] = list(_BUILDERS)
"""Names accepted by :func:`get_preset`."""


def get_preset(name: str) -> TransformerConfig:
    """A fresh :class:`TransformerConfig` for preset ``name`` (one of :data:`PRESETS`)."""
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise MegaliteError(f"unknown model preset {name!r}; choose one of "
                            f"{', '.join(PRESETS)}") from None
