"""megalite MoE models (LLaMA recipe with expert layers) <-> ``transformers``'
``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` and ``Qwen3MoeForCausalLM``: the name map (the
dense parts are :mod:`.hf_llama`'s, Qwen3's query/key norms included; the tensors as
``save_pretrained`` writes them, one per expert).

=================================================  ===============================================
megalite (full tensor, MoE layer i, expert e)      Mixtral / Qwen2-MoE and Qwen3-MoE (Qwen)
=================================================  ===============================================
layers.i.mlp.router.weight [E, h]                  block_sparse_moe.gate.weight / mlp.gate.weight
layers.i.mlp.experts.e.linear_fc1.weight [2f, h]   Mixtral experts.e.{w1 (gate), w3 (up)}.weight;
                                                   Qwen experts.e.{gate,up}_proj.weight
layers.i.mlp.experts.e.linear_fc2.weight [h, f]    Mixtral experts.e.w2.weight; Qwen down_proj
layers.i.mlp.shared_experts.linear_fc{1,2}.weight  Qwen2-MoE mlp.shared_expert.{gate,up,down}_proj
layers.i.mlp.shared_experts.gate_weight [1, h]     Qwen2-MoE mlp.shared_expert_gate.weight
=================================================  ===============================================

(``model.layers.i.`` prefixes omitted.) Which family a megalite config is: a QKV bias (and a
gated shared expert) is Qwen2-MoE, query/key norms (``qk_layernorm``, no shared expert) are
Qwen3-MoE, neither is Mixtral. Routing: Mixtral is top-k of the softmax, renormalised
(megalite's default); the Qwens' ``norm_topk_prob`` false is ``moe_router_pre_softmax``. Their
``mlp_only_layers`` / ``decoder_sparse_step`` become ``moe_layer_freq`` (a 0/1 list). Each
expert is its own tensor, so conversion streams expert by expert.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from megalite.convert import hf_llama
from megalite.convert.mapping import (ParamMapping, from_hf_state_dict, identity_mapping,
                                      to_hf_state_dict)
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.weights import layer_prefix

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _is_qwen2_moe(c: TransformerConfig) -> bool:
    return c.add_qkv_bias


def _is_qwen(c: TransformerConfig) -> bool:
    """Qwen2-MoE or Qwen3-MoE (``mlp.`` and gate/up/down names, dense layers allowed)."""
    return c.add_qkv_bias or c.qk_layernorm


def _fc1(mega: str, gate: str, up: str, f: int) -> ParamMapping:
    return ParamMapping(mega, (gate, up),
                        lambda t: tuple(x.contiguous() for x in torch.split(t, f, dim=0)),
                        lambda g, u: torch.cat([g, u], dim=0))


def param_mappings(config: TransformerConfig, padded_vocab: int | None = None
                   ) -> list[ParamMapping]:
    """Every megalite parameter of the full model with its Mixtral / Qwen2-MoE tensors."""
    c = config
    dense = c.replace(num_experts=None)     # the LLaMA map of every non-expert tensor
    maps = []
    qwen = _is_qwen(c)
    for m in hf_llama.param_mappings(dense, padded_vocab):
        name = m.megalite
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if layer is not None and c.is_moe_layer(layer) and ".mlp." in name:
            if name.endswith("mlp.linear_fc1.weight"):   # once per MoE layer
                maps.extend(_moe_layer(c, layer, qwen))
            continue
        maps.append(m)
    return maps


def _moe_layer(c: TransformerConfig, i: int, qwen: bool) -> list[ParamMapping]:
    m, h = layer_prefix(i) + "mlp.", f"model.layers.{i}." + ("mlp." if qwen else
                                                              "block_sparse_moe.")
    f = c.moe_ffn_size
    maps = [identity_mapping(m + "router.weight", h + "gate.weight")]
    for e in range(c.num_experts):
        x = f"{h}experts.{e}."
        if qwen:
            maps.append(_fc1(f"{m}experts.{e}.linear_fc1.weight", x + "gate_proj.weight",
                             x + "up_proj.weight", f))
            maps.append(identity_mapping(f"{m}experts.{e}.linear_fc2.weight",
                                         x + "down_proj.weight"))
        else:
            maps.append(_fc1(f"{m}experts.{e}.linear_fc1.weight", x + "w1.weight",
                             x + "w3.weight", f))
            maps.append(identity_mapping(f"{m}experts.{e}.linear_fc2.weight", x + "w2.weight"))
    if c.moe_shared_expert_intermediate_size:     # Qwen2-MoE (_check)
        s = h + "shared_expert."
        maps.append(_fc1(m + "shared_experts.linear_fc1.weight", s + "gate_proj.weight",
                         s + "up_proj.weight", c.moe_shared_expert_intermediate_size))
        maps.append(identity_mapping(m + "shared_experts.linear_fc2.weight",
                                     s + "down_proj.weight"))
        maps.append(identity_mapping(m + "shared_experts.gate_weight",
                                     h + "shared_expert_gate.weight"))
    return maps


def _check(c: TransformerConfig) -> None:
    hf_llama._check(c)
    if _is_qwen2_moe(c):
        if not (c.moe_shared_expert_intermediate_size and c.moe_shared_expert_gate):
            raise MegaliteError("Qwen2-MoE conversion (a QKV bias) needs a gated shared expert "
                                "(moe_shared_expert_intermediate_size, moe_shared_expert_gate)")
    elif c.qk_layernorm:
        if c.moe_shared_expert_intermediate_size:
            raise MegaliteError("Qwen3-MoE conversion (query/key norms) needs no shared expert "
                                "(unset moe_shared_expert_intermediate_size)")
    elif (c.moe_shared_expert_intermediate_size or c.moe_router_pre_softmax
          or c.moe_ffn_size != c.ffn_size or c.moe_layer_freq not in (1, [1] * c.num_layers)):
        raise MegaliteError("Mixtral conversion needs every layer MoE, expert width = "
                            "ffn_hidden_size, renormalised top-k and no shared expert (a "
                            "Qwen2-MoE model has a QKV bias, a Qwen3-MoE model query/key "
                            "norms)")
    if c.moe_expert_capacity_factor is not None:
        raise MegaliteError("Hugging Face MoE models are dropless: unset "
                            "moe_expert_capacity_factor to convert")


def to_hf(state: Mapping[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """Full megalite state dict -> Mixtral / Qwen2-MoE / Qwen3-MoE state dict."""
    _check(config)
    extra = {"lm_head.weight": "model.embed_tokens.weight"} if config.tied_embeddings else None
    return to_hf_state_dict(state, param_mappings(config, hf_llama._padded_rows(state, config)),
                            extra)


def from_hf(hf_state: Mapping[str, Tensor], config: TransformerConfig,
            padded_vocab: int | None = None) -> dict[str, Tensor]:
    """Mixtral / Qwen2-MoE / Qwen3-MoE state dict -> full megalite state dict."""
    _check(config)
    ignore = ("lm_head.weight",) if config.tied_embeddings else ()
    return from_hf_state_dict(hf_state, param_mappings(config, padded_vocab), ignore)


def hf_architecture(config: TransformerConfig) -> str:
    if config.qk_layernorm:
        return "Qwen3MoeForCausalLM"
    return "Qwen2MoeForCausalLM" if _is_qwen2_moe(config) else "MixtralForCausalLM"


def config_to_hf(config: TransformerConfig):
    """``MixtralConfig``, ``Qwen2MoeConfig`` or ``Qwen3MoeConfig`` with the same shapes."""
    _check(config)
    c = config
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.query_groups,
        head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.layernorm_epsilon, rope_parameters=hf_llama._rope_to_hf(c),
        tie_word_embeddings=c.tied_embeddings, attention_dropout=c.attention_dropout,
        initializer_range=c.init_method_std, bos_token_id=None, eos_token_id=None,
        num_experts_per_tok=c.moe_router_topk, router_aux_loss_coef=c.moe_aux_loss_coeff,
        architectures=[hf_architecture(c)])
    if _is_qwen(c):
        qwen = dict(intermediate_size=c.ffn_size, moe_intermediate_size=c.moe_ffn_size,
                    num_experts=c.num_experts, norm_topk_prob=not c.moe_router_pre_softmax,
                    decoder_sparse_step=1, use_sliding_window=False,
                    mlp_only_layers=[i for i in range(c.num_layers) if not c.is_moe_layer(i)])
        if c.qk_layernorm:
            from transformers import Qwen3MoeConfig
            return Qwen3MoeConfig(attention_bias=False, **qwen, **common)
        from transformers import Qwen2MoeConfig
        return Qwen2MoeConfig(
            shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size,
            **qwen, **common)
    from transformers import MixtralConfig
    return MixtralConfig(intermediate_size=c.moe_ffn_size, num_local_experts=c.num_experts,
                         sliding_window=None, **common)


def config_from_hf(hf) -> TransformerConfig:
    """:class:`TransformerConfig` from a ``MixtralConfig``, ``Qwen2MoeConfig`` or
    ``Qwen3MoeConfig``."""
    kind = hf.model_type
    window = getattr(hf, "sliding_window", None)
    if kind == "mixtral" and window is not None and window < hf.max_position_embeddings:
        raise MegaliteError(f"Mixtral config: sliding_window={window} is shorter than "
                            f"max_position_embeddings={hf.max_position_embeddings}; megalite "
                            f"attends to the whole causal context")
    if kind != "mixtral" and getattr(hf, "use_sliding_window", False):
        raise MegaliteError(f"{kind} config: use_sliding_window must be false")
    if getattr(hf, "router_jitter_noise", 0.0):
        raise MegaliteError(f"{kind} config: router_jitter_noise={hf.router_jitter_noise} is "
                            "not supported")
    base = hf_llama.config_from_hf(hf)
    if kind == "mixtral":
        return base.replace(num_experts=hf.num_local_experts,
                            moe_router_topk=hf.num_experts_per_tok,
                            moe_aux_loss_coeff=float(hf.router_aux_loss_coef))
    step, only = hf.decoder_sparse_step, set(hf.mlp_only_layers or [])
    freq = [int(i not in only and (i + 1) % step == 0) for i in range(hf.num_hidden_layers)]
    routed = dict(num_experts=hf.num_experts, moe_router_topk=hf.num_experts_per_tok,
                  moe_ffn_hidden_size=hf.moe_intermediate_size,
                  moe_router_pre_softmax=not hf.norm_topk_prob,
                  moe_layer_freq=1 if all(freq) else freq,
                  moe_aux_loss_coeff=float(hf.router_aux_loss_coef))
    if kind == "qwen3_moe":     # hf_llama read the query/key norms and the (absent) biases
        return base.replace(**routed)
    return base.replace(
        add_bias_linear=False, add_qkv_bias=bool(getattr(hf, "qkv_bias", True)),
        moe_shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
        moe_shared_expert_gate=True, **routed)
