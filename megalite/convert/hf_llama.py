"""megalite LLaMA recipe <-> ``transformers.LlamaForCausalLM`` (and ``MistralForCausalLM`` /
``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``, the same tensors): the one name map.

==========================================  ===============================================
megalite (full tensor)                      Hugging Face
==========================================  ===============================================
embedding.word_embeddings.weight [Vp, h]    model.embed_tokens.weight [V, h] (padding dropped)
layers.i.input_norm.weight                  model.layers.i.input_layernorm.weight
layers.i.attention.linear_qkv.weight        model.layers.i.self_attn.{q,k,v}_proj.weight
  [(a + 2g) d, h], grouped (see convert)      (concatenated per key/value group)
layers.i.attention.linear_qkv.bias          ...{q,k,v}_proj.bias (attention_bias; Qwen2)
layers.i.attention.linear_proj.weight       model.layers.i.self_attn.o_proj.weight (+ .bias)
layers.i.attention.{q,k}_layernorm.weight   model.layers.i.self_attn.{q,k}_norm.weight (Qwen3:
  [d] (qk_layernorm)                          the query/key norm per head)
layers.i.post_attention_norm.weight         model.layers.i.post_attention_layernorm.weight
layers.i.mlp.linear_fc1.weight [2f, h]      model.layers.i.mlp.{gate,up}_proj.weight ([gate; up])
layers.i.mlp.linear_fc2.weight [h, f]       model.layers.i.mlp.down_proj.weight (+ .bias)
final_norm.weight                           model.norm.weight
output_layer.weight [Vp, h] (untied)        lm_head.weight [V, h]
==========================================  ===============================================

RoPE uses the same rotate-half convention on both sides, so q/k need no permutation. HF's
``rope_parameters`` of type default, ``linear`` and ``llama3`` (Llama 3.1/3.2) map to
``TransformerConfig.rope_scaling`` and its factors; other types (yarn, dynamic, longrope) are refused.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from megalite.convert.mapping import (ParamMapping, from_hf_state_dict, grouped_to_qkv,
                                      identity_mapping, qkv_to_grouped, to_hf_state_dict,
                                      vocab_mapping)
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.weights import (FINAL_NORM, INPUT_NORM, K_LAYERNORM, LINEAR_FC1, LINEAR_FC2,
                                    LINEAR_PROJ, LINEAR_QKV, OUTPUT_LAYER, POST_ATTENTION_NORM,
                                    Q_LAYERNORM, WORD_EMBEDDINGS, layer_prefix)


def param_mappings(config: TransformerConfig, padded_vocab: int | None = None) -> list[ParamMapping]:
    """Every megalite parameter of the full model with its LLaMA tensors (module table)."""
    c = config
    vp = padded_vocab or c.padded_vocab(1)
    a, g, d, f = c.num_attention_heads, c.query_groups, c.head_dim, c.ffn_size
    maps = [vocab_mapping(WORD_EMBEDDINGS, "model.embed_tokens.weight", c.vocab_size, vp)]
    suffixes = ("weight", "bias") if c.add_bias_linear else ("weight",)
    qkv_suffixes = ("weight", "bias") if c.add_bias_linear or c.add_qkv_bias else ("weight",)
    for i in range(c.num_layers):
        m, h = layer_prefix(i), f"model.layers.{i}."
        maps.append(identity_mapping(f"{m}{INPUT_NORM}.weight", h + "input_layernorm.weight"))
        for s in qkv_suffixes:
            maps.append(ParamMapping(
                f"{m}{LINEAR_QKV}.{s}",
                tuple(f"{h}self_attn.{p}_proj.{s}" for p in "qkv"),
                lambda t: grouped_to_qkv(t, a, g, d),
                lambda q, k, v: qkv_to_grouped(q, k, v, g)))
        for s in suffixes:
            maps.append(identity_mapping(f"{m}{LINEAR_PROJ}.{s}", f"{h}self_attn.o_proj.{s}"))
        if c.qk_layernorm:
            for mega, theirs in ((Q_LAYERNORM, "q_norm"), (K_LAYERNORM, "k_norm")):
                maps.append(identity_mapping(f"{m}{mega}.weight", f"{h}self_attn.{theirs}.weight"))
        maps.append(identity_mapping(f"{m}{POST_ATTENTION_NORM}.weight",
                                     h + "post_attention_layernorm.weight"))
        for s in suffixes:
            maps.append(ParamMapping(
                f"{m}{LINEAR_FC1}.{s}", (f"{h}mlp.gate_proj.{s}", f"{h}mlp.up_proj.{s}"),
                lambda t: tuple(x.contiguous() for x in torch.split(t, f, dim=0)),
                lambda gate, up: torch.cat([gate, up], dim=0)))
            maps.append(identity_mapping(f"{m}{LINEAR_FC2}.{s}", f"{h}mlp.down_proj.{s}"))
    maps.append(identity_mapping(f"{FINAL_NORM}.weight", "model.norm.weight"))
    if not c.tied_embeddings:
        maps.append(vocab_mapping(OUTPUT_LAYER, "lm_head.weight", c.vocab_size, vp))
    return maps


def _check(config: TransformerConfig) -> None:
    c = config
    if (c.normalization, c.position_embedding_type, c.activation) != ("RMSNorm", "rope", "swiglu"):
        raise MegaliteError("LLaMA conversion needs normalization=RMSNorm, "
                            "position_embedding_type=rope, activation=swiglu")
    if c.qk_layernorm and (c.add_bias_linear or c.add_qkv_bias):
        raise MegaliteError("Qwen3 conversion (query/key norms) needs no linear biases "
                            "(Qwen3's attention_bias is false in every released model)")


def to_hf(state: Mapping[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """Full megalite state dict -> ``LlamaForCausalLM`` state dict."""
    _check(config)
    extra = {"lm_head.weight": "model.embed_tokens.weight"} if config.tied_embeddings else None
    return to_hf_state_dict(state, param_mappings(config, _padded_rows(state, config)), extra)


def from_hf(hf_state: Mapping[str, Tensor], config: TransformerConfig,
            padded_vocab: int | None = None) -> dict[str, Tensor]:
    """``LlamaForCausalLM`` state dict -> full megalite state dict."""
    _check(config)
    ignore = ("lm_head.weight",) if config.tied_embeddings else ()
    return from_hf_state_dict(hf_state, param_mappings(config, padded_vocab), ignore)


def _padded_rows(state: Mapping[str, Tensor], config: TransformerConfig) -> int:
    emb = state.get(WORD_EMBEDDINGS)
    return emb.shape[0] if emb is not None else config.padded_vocab(1)


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Hugging Face model types read as the LLaMA recipe (Mistral without a sliding window, Qwen2
with its QKV bias and full attention, Qwen3 with its query/key norms)."""


def hf_architecture(config: TransformerConfig) -> str:
    """The ``transformers`` class :func:`config_to_hf` describes: ``Qwen3ForCausalLM`` with
    query/key norms, ``Qwen2ForCausalLM`` for a QKV bias without the other biases, else
    ``LlamaForCausalLM``."""
    if config.qk_layernorm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if _is_qwen2(config) else "LlamaForCausalLM"


def _is_qwen2(c: TransformerConfig) -> bool:
    return c.add_qkv_bias and not c.add_bias_linear


def config_to_hf(config: TransformerConfig):
    """``transformers.LlamaConfig`` (or ``Qwen2Config``, see :func:`hf_architecture`) with the
    same shapes (dropout off: attention only)."""
    _check(config)
    c = config
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.query_groups, head_dim=c.head_dim, hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.layernorm_epsilon,
        rope_parameters=_rope_to_hf(c), tie_word_embeddings=c.tied_embeddings,
        attention_dropout=c.attention_dropout, initializer_range=c.init_method_std,
        bos_token_id=None, eos_token_id=None, architectures=[hf_architecture(c)])
    if c.qk_layernorm:
        from transformers import Qwen3Config
        return Qwen3Config(use_sliding_window=False, attention_bias=False, **common)
    if _is_qwen2(c):
        from transformers import Qwen2Config
        return Qwen2Config(use_sliding_window=False, **common)
    from transformers import LlamaConfig
    return LlamaConfig(attention_bias=c.add_bias_linear, mlp_bias=c.add_bias_linear, **common)


def config_from_hf(hf) -> TransformerConfig:
    """:class:`TransformerConfig` from a ``transformers`` LlamaConfig, MistralConfig or Qwen2Config
    (errors on options megalite does not have)."""
    kind = getattr(hf, "model_type", "llama")
    name = {"llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
            "qwen3_moe": "Qwen3-MoE"}.get(kind, kind)
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise MegaliteError(f"{name} config: hidden_act={hf.hidden_act!r} is not supported "
                            "(only silu, i.e. SwiGLU)")
    rope = getattr(hf, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    window = getattr(hf, "sliding_window", None)
    if kind in ("qwen2", "qwen3") and any(t != "full_attention"
                                          for t in (getattr(hf, "layer_types", None) or [])):
        raise MegaliteError(f"{name} config: sliding-window attention layers are not supported "
                            "(use_sliding_window must be false)")
    if kind == "mistral" and window is not None and window < hf.max_position_embeddings:
        raise MegaliteError(f"Mistral config: sliding_window={window} is shorter than "
                            f"max_position_embeddings={hf.max_position_embeddings}; megalite "
                            f"attends to the whole causal context (no sliding window)")
    qk_norm = kind in ("qwen3", "qwen3_moe")
    if kind == "qwen2":     # q/k/v always have a bias, o_proj and the MLP never do
        bias, qkv_bias = False, True
    elif qk_norm:           # attention_bias: q/k/v/o biases but none in the MLP
        if getattr(hf, "attention_bias", False):
            raise MegaliteError(f"{name} config: attention_bias=true is not supported (biases "
                                "on q/k/v/o without MLP biases)")
        bias, qkv_bias = False, False
    else:
        bias, qkv_bias = bool(getattr(hf, "attention_bias", False)), False
        if bias != bool(getattr(hf, "mlp_bias", False)):
            raise MegaliteError(f"{name} config: attention_bias and mlp_bias must agree "
                                "(megalite has one add_bias_linear switch)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return TransformerConfig(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads, vocab_size=hf.vocab_size,
        num_query_groups=(None if hf.num_key_value_heads in (None, hf.num_attention_heads)
                          else hf.num_key_value_heads),
        ffn_hidden_size=hf.intermediate_size,
        kv_channels=None if head_dim * hf.num_attention_heads == hf.hidden_size else head_dim,
        max_position_embeddings=hf.max_position_embeddings, position_embedding_type="rope",
        rotary_base=float(theta), normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps,
        activation="swiglu", add_bias_linear=bias, add_qkv_bias=qkv_bias, qk_layernorm=qk_norm,
        untie_embeddings_and_output_weights=not hf.tie_word_embeddings,
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        init_method_std=hf.initializer_range, **_rope_from_hf(rope, hf, name))


def _rope_to_hf(c: TransformerConfig) -> dict:
    out = {"rope_type": c.rope_scaling or "default", "rope_theta": float(c.rotary_base)}
    if c.rope_scaling is not None:
        out["factor"] = float(c.rope_scaling_factor)
    if c.rope_scaling == "llama3":
        out.update(low_freq_factor=float(c.rope_low_freq_factor),
                   high_freq_factor=float(c.rope_high_freq_factor),
                   original_max_position_embeddings=c.rope_original_max_position_embeddings)
    return out


def _rope_from_hf(rope: dict, hf, name: str) -> dict:
    """TransformerConfig rope-scaling fields from HF's ``rope_parameters`` (default, linear, llama3)."""
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {}
    if kind not in ("linear", "llama3"):
        raise MegaliteError(f"{name} config: rope_type={kind!r} is not supported (default, "
                            f"linear and llama3 are)")
    if rope.get("attention_factor") not in (None, 1.0):
        raise MegaliteError(f"{name} config: rope attention_factor={rope['attention_factor']} "
                            f"is not supported")
    out = {"rope_scaling": kind, "rope_scaling_factor": float(rope["factor"])}
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_position_embeddings=int(
                       rope.get("original_max_position_embeddings")
                       or hf.max_position_embeddings))
    return out
