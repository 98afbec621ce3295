"""megalite BERT <-> ``transformers.BertForPreTraining`` (post-norm) and
``MegatronBertForPreTraining`` (pre-norm), or their ``...ForMaskedLM`` without the binary head:
the one name map (the BERT family's ``hf_converter``, :mod:`megalite.families`).

==========================================  ===============================================
megalite (full tensor)                      Hugging Face (``bert.`` prefix where it starts
                                            with ``embeddings``, ``encoder``, ``pooler``)
==========================================  ===============================================
embedding.word_embeddings.weight [Vp, h]    embeddings.word_embeddings.weight [V, h]
embedding.position_embeddings.weight        embeddings.position_embeddings.weight
embedding.tokentype_embeddings.weight       embeddings.token_type_embeddings.weight
embedding.norm.{weight,bias} (post-norm)    embeddings.LayerNorm.{weight,bias}
layers.i.attention.linear_qkv.{w,b}         encoder.layer.i.attention.self.{query,key,value}
  grouped per head: q_j, k_j, v_j             (concatenated per head)
layers.i.attention.linear_proj.{w,b}        encoder.layer.i.attention.output.dense
layers.i.input_norm.{w,b}                   post: ...attention.output.LayerNorm;
                                            pre: ...attention.ln
layers.i.mlp.linear_fc1.{w,b}               encoder.layer.i.intermediate.dense
layers.i.mlp.linear_fc2.{w,b}               encoder.layer.i.output.dense
layers.i.post_attention_norm.{w,b}          post: ...output.LayerNorm; pre: encoder.layer.i.ln
final_norm.{weight,bias} (pre-norm)         encoder.ln.{weight,bias}
lm_head.dense.{w,b}                         cls.predictions.transform.dense
lm_head.norm.{w,b}                          cls.predictions.transform.LayerNorm
lm_head.output_bias [Vp]                    cls.predictions.bias [V] (= ...decoder.bias)
output_layer.weight (untied only)           cls.predictions.decoder.weight
pooler.{w,b}, binary_head.{w,b}             pooler.dense, cls.seq_relationship
==========================================  ===============================================

A model without token types (Megatron-LM's ``--bert-no-binary-head``) goes out with one zero
token-type row: Hugging Face always adds ``token_type_embeddings[0]``, and a zero row adds
nothing, so the logits are the same.
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
from megalite.model.weights import (BINARY_HEAD, EMBEDDING_NORM, FINAL_NORM, INPUT_NORM,
                                    LINEAR_FC1, LINEAR_FC2, LINEAR_PROJ, LINEAR_QKV,
                                    LM_HEAD_DENSE, LM_HEAD_NORM, OUTPUT_BIAS, OUTPUT_LAYER,
                                    POOLER, POSITION_EMBEDDINGS, POST_ATTENTION_NORM,
                                    TOKENTYPE_EMBEDDINGS, WORD_EMBEDDINGS, layer_prefix)

MODEL_TYPES = ("bert", "megatron-bert")
"""Hugging Face model types of this converter: post-norm and pre-norm BERT."""
TOKENIZER_FILES = ("vocab.txt",)
"""The tokenizer ``from-hf`` takes: the WordPiece vocab (what BERT data is made with)."""
_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_OUR_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# Tensors a Hugging Face BERT directory may hold that megalite does not: buffers and the tied
# copies of the output matrix and bias.
_IGNORED = (".position_ids", "cls.predictions.decoder.bias")


def _both(megalite: str, hf: str) -> list[ParamMapping]:
    return [identity_mapping(f"{megalite}.{s}", f"{hf}.{s}") for s in ("weight", "bias")]


def param_mappings(config: TransformerConfig, padded_vocab: int | None = None) -> list[ParamMapping]:
    """Every megalite parameter of the full model with its BERT tensors (module table)."""
    _check(config)
    c = config
    vp = padded_vocab or c.padded_vocab(1)
    a, d = c.num_attention_heads, c.head_dim
    post = c.norm_placement == "post"
    e = "bert.embeddings."
    maps = [vocab_mapping(WORD_EMBEDDINGS, e + "word_embeddings.weight", c.vocab_size, vp),
            identity_mapping(POSITION_EMBEDDINGS, e + "position_embeddings.weight")]
    if c.tokentypes:
        maps.append(identity_mapping(TOKENTYPE_EMBEDDINGS, e + "token_type_embeddings.weight"))
    if post:
        maps += _both(EMBEDDING_NORM, e + "LayerNorm")
    for i in range(c.num_layers):
        m, h = layer_prefix(i), f"bert.encoder.layer.{i}."
        for s in ("weight", "bias"):
            maps.append(ParamMapping(
                f"{m}{LINEAR_QKV}.{s}",
                tuple(f"{h}attention.self.{p}.{s}" for p in ("query", "key", "value")),
                lambda t: grouped_to_qkv(t, a, a, d), lambda q, k, v: qkv_to_grouped(q, k, v, a)))
        maps += _both(f"{m}{LINEAR_PROJ}", h + "attention.output.dense")
        maps += _both(f"{m}{INPUT_NORM}", h + ("attention.output.LayerNorm" if post
                                              else "attention.ln"))
        maps += _both(f"{m}{LINEAR_FC1}", h + "intermediate.dense")
        maps += _both(f"{m}{LINEAR_FC2}", h + "output.dense")
        maps += _both(f"{m}{POST_ATTENTION_NORM}", h + ("output.LayerNorm" if post else "ln"))
    if not post:
        maps += _both(FINAL_NORM, "bert.encoder.ln")
    maps += _both(LM_HEAD_DENSE, "cls.predictions.transform.dense")
    maps += _both(LM_HEAD_NORM, "cls.predictions.transform.LayerNorm")
    maps.append(vocab_mapping(OUTPUT_BIAS, "cls.predictions.bias", c.vocab_size, vp))
    if not c.tied_embeddings:
        maps.append(vocab_mapping(OUTPUT_LAYER, "cls.predictions.decoder.weight",
                                  c.vocab_size, vp))
    if c.bert_binary_head:
        maps += _both(POOLER, "bert.pooler.dense") + _both(BINARY_HEAD, "cls.seq_relationship")
    return maps


def _check(config: TransformerConfig) -> None:
    c = config
    if c.model_type != "bert" or c.normalization != "LayerNorm" or not c.add_bias_linear \
            or c.query_groups != c.num_attention_heads or c.activation not in _OUR_ACT \
            or c.kv_channels not in (None, c.hidden_size // c.num_attention_heads) \
            or c.qk_layernorm:
        raise MegaliteError("this BERT model has no exact Hugging Face counterpart (BERT needs "
                            "LayerNorm, biases, gelu, no grouped-query attention, head width "
                            "hidden / heads, no query/key norms)")


def hf_architecture(config: TransformerConfig) -> str:
    """``[Megatron]Bert`` ``ForPreTraining`` (with the binary head) or ``ForMaskedLM``."""
    prefix = "Bert" if config.norm_placement == "post" else "MegatronBert"
    return prefix + ("ForPreTraining" if config.bert_binary_head else "ForMaskedLM")


def extra_tensors(config: TransformerConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Hugging Face tensors with no megalite parameter behind them: the zero token-type row of
    a model without token types (module doc)."""
    if config.tokentypes:
        return {}
    return {"bert.embeddings.token_type_embeddings.weight":
            torch.zeros(1, config.hidden_size, dtype=dtype)}


def to_hf(state: Mapping[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """Full megalite state dict -> the Hugging Face state dict (tied copies included)."""
    emb = state.get(WORD_EMBEDDINGS)
    vp = emb.shape[0] if emb is not None else None
    extra = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
    if config.tied_embeddings:
        extra["cls.predictions.decoder.weight"] = "bert.embeddings.word_embeddings.weight"
    out = to_hf_state_dict(state, param_mappings(config, vp), extra)
    out.update(extra_tensors(config, out["bert.embeddings.word_embeddings.weight"].dtype))
    return out


def hf_model_class(config: TransformerConfig):
    """The ``transformers`` auto class that loads the converted model (``--verify``)."""
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining
    return AutoModelForPreTraining if config.bert_binary_head else AutoModelForMaskedLM


def verify_logits(ours, theirs, tokens: Tensor, config: TransformerConfig
                  ) -> tuple[Tensor, Tensor]:
    """(megalite's, Hugging Face's) outputs on ``tokens`` [n, s] (segment A the first half,
    B the rest, when the model has token types), flattened: the masked-LM logits over the
    Hugging Face model's vocabulary, then the binary-head logits."""
    vocab = theirs.config.vocab_size
    types = torch.zeros_like(tokens)
    if config.tokentypes >= 2:
        types[:, tokens.shape[1] // 2:] = 1
    lm, binary = ours(tokens, None, types)
    out = theirs(input_ids=tokens, token_type_ids=types)
    if config.bert_binary_head:
        return (torch.cat([lm[..., :vocab].flatten(), binary.flatten()]).float(),
                torch.cat([out.prediction_logits.flatten(),
                           out.seq_relationship_logits.flatten()]).float())
    return lm[..., :vocab].float(), out.logits.float()


def from_hf(hf_state: Mapping[str, Tensor], config: TransformerConfig,
            padded_vocab: int | None = None) -> dict[str, Tensor]:
    """Hugging Face BERT state dict -> full megalite state dict."""
    return from_hf_state_dict(hf_state, param_mappings(config, padded_vocab),
                              ignored_names(config, hf_state))


def ignored_names(config: TransformerConfig, names) -> tuple[str, ...]:
    """HF tensors of ``names`` the megalite model does not hold: buffers, tied copies, and the
    pooler of a model without the binary head (``BertForMaskedLM`` checkpoints may keep it)."""
    drop = [n for n in names if n.endswith(_IGNORED)]
    if config.tied_embeddings:
        drop.append("cls.predictions.decoder.weight")
    if not config.bert_binary_head:
        drop += ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    return tuple(drop)


def config_to_hf(config: TransformerConfig):
    """``transformers.BertConfig`` (post-norm) or ``MegatronBertConfig`` (pre-norm) with the
    same shapes and dropout rates."""
    _check(config)
    c = config
    from transformers import BertConfig, MegatronBertConfig
    cls = BertConfig if c.norm_placement == "post" else MegatronBertConfig
    return cls(
        architectures=[hf_architecture(c)], vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        intermediate_size=c.ffn_size, hidden_act=_OUR_ACT[c.activation],
        hidden_dropout_prob=c.hidden_dropout, attention_probs_dropout_prob=c.attention_dropout,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=max(c.tokentypes, 1),
        initializer_range=c.init_method_std, layer_norm_eps=c.layernorm_epsilon,
        tie_word_embeddings=c.tied_embeddings, pad_token_id=None)


def config_from_hf(hf, names=None) -> TransformerConfig:
    """:class:`TransformerConfig` from a ``transformers`` BertConfig / MegatronBertConfig.
    ``names``: the checkpoint's tensor names, when known: the binary head is there iff
    ``cls.seq_relationship.weight`` is (else the config's ``architectures`` decide)."""
    act = _HF_ACT.get(hf.hidden_act)
    if act is None:
        raise MegaliteError(f"BERT config: hidden_act={hf.hidden_act!r} is not supported (one "
                            f"of {sorted(_HF_ACT)})")
    kind = getattr(hf, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise MegaliteError(f"BERT config: position_embedding_type={kind!r} is not supported "
                            f"(absolute)")
    if names is not None:
        binary = "cls.seq_relationship.weight" in names
    else:
        binary = any(a.endswith("ForPreTraining") for a in (hf.architectures or []))
    return TransformerConfig(
        model_type="bert", norm_placement="post" if hf.model_type == "bert" else "pre",
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads, vocab_size=hf.vocab_size,
        ffn_hidden_size=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
        position_embedding_type="learned_absolute", normalization="LayerNorm",
        layernorm_epsilon=hf.layer_norm_eps, activation=act, add_bias_linear=True,
        untie_embeddings_and_output_weights=not getattr(hf, "tie_word_embeddings", True),
        hidden_dropout=float(hf.hidden_dropout_prob),
        attention_dropout=float(hf.attention_probs_dropout_prob),
        init_method_std=hf.initializer_range, bert_binary_head=binary,
        num_tokentypes=hf.type_vocab_size)
