"""megalite classic recipe <-> ``transformers.GPT2LMHeadModel``: the one name map.

==========================================  ===============================================
megalite (full tensor)                      Hugging Face (Conv1D weights are [in, out])
==========================================  ===============================================
embedding.word_embeddings.weight [Vp, h]    transformer.wte.weight [V, h] (padding dropped)
embedding.position_embeddings.weight        transformer.wpe.weight
layers.i.input_norm.{weight,bias}           transformer.h.i.ln_1.{weight,bias}
layers.i.attention.linear_qkv.weight        transformer.h.i.attn.c_attn.weight [h, 3h]
  [3h, h], grouped per head: q_j, k_j, v_j    (columns [q | k | v]), transposed and regrouped
layers.i.attention.linear_qkv.bias          transformer.h.i.attn.c_attn.bias (regrouped)
layers.i.attention.linear_proj.{w,b}        transformer.h.i.attn.c_proj.{weight^T,bias}
layers.i.post_attention_norm.{weight,bias}  transformer.h.i.ln_2.{weight,bias}
layers.i.mlp.linear_fc1.{w,b}               transformer.h.i.mlp.c_fc.{weight^T,bias}
layers.i.mlp.linear_fc2.{w,b}               transformer.h.i.mlp.c_proj.{weight^T,bias}
final_norm.{weight,bias}                    transformer.ln_f.{weight,bias}
(tied: no output layer)                     lm_head.weight (= transformer.wte.weight)
==========================================  ===============================================
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from megalite.convert.architectures import architecture_of
from megalite.convert.mapping import (ParamMapping, from_hf_state_dict, grouped_to_qkv,
                                      identity_mapping, qkv_to_grouped, to_hf_state_dict,
                                      transposed_mapping, vocab_mapping)
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.weights import (FINAL_NORM, INPUT_NORM, LINEAR_FC1, LINEAR_FC2, LINEAR_PROJ,
                                    LINEAR_QKV, POSITION_EMBEDDINGS, POST_ATTENTION_NORM,
                                    WORD_EMBEDDINGS, layer_prefix)

_HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_OUR_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def param_mappings(config: TransformerConfig, padded_vocab: int | None = None) -> list[ParamMapping]:
    """Every megalite parameter of the full model with its GPT-2 tensors (module table)."""
    c = config
    vp = padded_vocab or c.padded_vocab(1)
    a, d = c.num_attention_heads, c.head_dim

    def qkv_to_hf(t: Tensor) -> tuple[Tensor]:
        q, k, v = grouped_to_qkv(t, a, a, d)
        fused = torch.cat([q, k, v], dim=0)                    # [3h, ...] rows q | k | v
        return (fused.t().contiguous() if fused.dim() == 2 else fused,)

    def qkv_from_hf(t: Tensor) -> Tensor:
        rows = t.t() if t.dim() == 2 else t                     # [3h, ...]
        q, k, v = torch.split(rows, a * d, dim=0)
        return qkv_to_grouped(q, k, v, a)

    maps = [vocab_mapping(WORD_EMBEDDINGS, "transformer.wte.weight", c.vocab_size, vp),
            identity_mapping(POSITION_EMBEDDINGS, "transformer.wpe.weight")]
    for i in range(c.num_layers):
        m, h = layer_prefix(i), f"transformer.h.{i}."
        for s in ("weight", "bias"):
            maps.append(identity_mapping(f"{m}{INPUT_NORM}.{s}", f"{h}ln_1.{s}"))
        for s in ("weight", "bias"):
            maps.append(ParamMapping(f"{m}{LINEAR_QKV}.{s}", (f"{h}attn.c_attn.{s}",),
                                     qkv_to_hf, qkv_from_hf))
        maps.append(transposed_mapping(f"{m}{LINEAR_PROJ}.weight", f"{h}attn.c_proj.weight"))
        maps.append(identity_mapping(f"{m}{LINEAR_PROJ}.bias", f"{h}attn.c_proj.bias"))
        for s in ("weight", "bias"):
            maps.append(identity_mapping(f"{m}{POST_ATTENTION_NORM}.{s}", f"{h}ln_2.{s}"))
        maps.append(transposed_mapping(f"{m}{LINEAR_FC1}.weight", f"{h}mlp.c_fc.weight"))
        maps.append(identity_mapping(f"{m}{LINEAR_FC1}.bias", f"{h}mlp.c_fc.bias"))
        maps.append(transposed_mapping(f"{m}{LINEAR_FC2}.weight", f"{h}mlp.c_proj.weight"))
        maps.append(identity_mapping(f"{m}{LINEAR_FC2}.bias", f"{h}mlp.c_proj.bias"))
    for s in ("weight", "bias"):
        maps.append(identity_mapping(f"{FINAL_NORM}.{s}", f"transformer.ln_f.{s}"))
    return maps


def _check(config: TransformerConfig) -> None:
    if architecture_of(config) != "gpt2":
        raise MegaliteError("GPT-2 conversion needs the classic recipe (LayerNorm, learned "
                            "positions, gelu, bias, tied embeddings, no GQA)")


def to_hf(state: Mapping[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """Full megalite state dict -> ``GPT2LMHeadModel`` state dict (lm_head tied to wte)."""
    _check(config)
    emb = state.get(WORD_EMBEDDINGS)
    vp = emb.shape[0] if emb is not None else None
    return to_hf_state_dict(state, param_mappings(config, vp),
                            {"lm_head.weight": "transformer.wte.weight"})


def from_hf(hf_state: Mapping[str, Tensor], config: TransformerConfig,
            padded_vocab: int | None = None) -> dict[str, Tensor]:
    """``GPT2LMHeadModel`` state dict -> full megalite state dict.

    Old checkpoints' causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are ignored.
    """
    _check(config)
    ignore = ("lm_head.weight",) + tuple(
        k for k in hf_state if k.endswith((".attn.masked_bias",))
        or (k.endswith(".attn.bias") and k.startswith("transformer.h.")))
    return from_hf_state_dict(hf_state, param_mappings(config, padded_vocab), ignore)


def config_to_hf(config: TransformerConfig):
    """``transformers.GPT2Config`` with the same shapes and dropout rates."""
    from transformers import GPT2Config
    _check(config)
    c = config
    return GPT2Config(
        architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size, n_positions=c.max_position_embeddings, n_embd=c.hidden_size,
        n_layer=c.num_layers, n_head=c.num_attention_heads, n_inner=c.ffn_size,
        activation_function=_OUR_ACT[c.activation], resid_pdrop=c.hidden_dropout,
        embd_pdrop=c.hidden_dropout, attn_pdrop=c.attention_dropout,
        layer_norm_epsilon=c.layernorm_epsilon, initializer_range=c.init_method_std,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        bos_token_id=None, eos_token_id=None)


def config_from_hf(hf) -> TransformerConfig:
    """:class:`TransformerConfig` from a ``transformers.GPT2Config`` (errors on unsupported options)."""
    act = _HF_ACT.get(hf.activation_function)
    if act is None:
        raise MegaliteError(f"GPT-2 config: activation_function={hf.activation_function!r} is "
                            f"not supported (one of {sorted(_HF_ACT)})")
    if not getattr(hf, "scale_attn_weights", True) or getattr(
            hf, "scale_attn_by_inverse_layer_idx", False):
        raise MegaliteError("GPT-2 config: only scale_attn_weights=True and "
                            "scale_attn_by_inverse_layer_idx=False are supported")
    return TransformerConfig(
        num_layers=hf.n_layer, hidden_size=hf.n_embd, num_attention_heads=hf.n_head,
        vocab_size=hf.vocab_size, ffn_hidden_size=hf.n_inner or 4 * hf.n_embd,
        max_position_embeddings=hf.n_positions, position_embedding_type="learned_absolute",
        normalization="LayerNorm", layernorm_epsilon=hf.layer_norm_epsilon, activation=act,
        add_bias_linear=True, untie_embeddings_and_output_weights=False,
        hidden_dropout=float(hf.resid_pdrop), attention_dropout=float(hf.attn_pdrop),
        init_method_std=hf.initializer_range)
