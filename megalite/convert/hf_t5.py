"""megalite encoder-decoder (T5 switches) <-> ``transformers.T5ForConditionalGeneration``:
the one name map. ``S`` is ``encoder`` or ``decoder``; decoder blocks have the cross-attention
as their ``layer.1`` and the MLP as ``layer.2`` (encoder blocks: MLP at ``layer.1``).

================================================  ===========================================
megalite (full tensor)                            Hugging Face
================================================  ===========================================
embedding.word_embeddings.weight [Vp, h]          shared.weight [V, h] (padding dropped; also
                                                  S.embed_tokens.weight, and tied lm_head)
S.relative_position_bias.weight [buckets, a]      S.block.0.layer.0.SelfAttention.
                                                  relative_attention_bias.weight
S.layers.i.input_norm.weight                      S.block.i.layer.0.layer_norm.weight
S.layers.i.attention.linear_qkv.weight            S.block.i.layer.0.SelfAttention.{q,k,v}.weight
  [3 a d, h], grouped per head q_j, k_j, v_j        (concatenated per head)
S.layers.i.attention.linear_proj.weight           S.block.i.layer.0.SelfAttention.o.weight
decoder.layers.i.cross_attention_norm.weight      decoder.block.i.layer.1.layer_norm.weight
decoder.layers.i.cross_attention.linear_q.weight  decoder.block.i.layer.1.EncDecAttention.q.weight
decoder.layers.i.cross_attention.linear_kv.weight ...EncDecAttention.{k,v}.weight (per head k_j,
  [2 a d, h]                                        v_j)
decoder.layers.i.cross_attention.linear_proj.w    ...EncDecAttention.o.weight
S.layers.i.post_attention_norm.weight             S.block.i.layer.{1|2}.layer_norm.weight
S.layers.i.mlp.linear_fc1.weight                  ...DenseReluDense.wi.weight (v1.0, ReLU) or
                                                  [wi_0; wi_1] (v1.1, gated GELU)
S.layers.i.mlp.linear_fc2.weight                  ...DenseReluDense.wo.weight
S.final_norm.weight                               S.final_layer_norm.weight
output_layer.weight [Vp, h] (untied, v1.1)        lm_head.weight [V, h]
================================================  ===========================================

Tying. transformers 5 always builds ``lm_head`` tied to ``shared`` and keeps them apart only
when a checkpoint holds a different ``lm_head.weight``; its config's ``scale_decoder_outputs``
(the ``tie_word_embeddings`` of older configs) says whether the decoder output is scaled by
h^-0.5. A megalite model is untied exactly when the checkpoint's ``lm_head.weight`` differs from
``shared.weight`` (:func:`tied_in_checkpoint`).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from megalite.convert.mapping import (ParamMapping, from_hf_state_dict, grouped_to_qkv,
                                      identity_mapping, qkv_to_grouped, to_hf_state_dict,
                                      vocab_mapping)
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.weights import (CROSS_ATTENTION_NORM, CROSS_LINEAR_KV, CROSS_LINEAR_PROJ,
                                    CROSS_LINEAR_Q, DECODER, ENCODER, FINAL_NORM, INPUT_NORM,
                                    LINEAR_FC1, LINEAR_FC2, LINEAR_PROJ, LINEAR_QKV, OUTPUT_LAYER,
                                    POST_ATTENTION_NORM, RELATIVE_POSITION_BIAS, WORD_EMBEDDINGS,
                                    layer_prefix)

# from-hf's tokenizer candidates in order (T5 directories name the SentencePiece model
# spiece.model; its tokenizer.json would turn the text <pad> into the control id).
TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "tokenizer.json")

MODEL_TYPES = ("t5",)
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
"""HF names that repeat ``shared.weight`` (never read; filled in for a strict state-dict load)."""
IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
"""A tensor some old checkpoints carry that T5 never uses (HF ignores it too)."""
_ACT = {"relu": "relu", "geglu": "gated-gelu"}


def param_mappings(config: TransformerConfig, padded_vocab: int | None = None) -> list[ParamMapping]:
    """Every megalite parameter of the full model with its T5 tensors (module table)."""
    c = config
    _check(c)
    vp = padded_vocab or c.padded_vocab(1)
    a, d, f = c.num_attention_heads, c.head_dim, c.ffn_size
    maps = [vocab_mapping(WORD_EMBEDDINGS, "shared.weight", c.vocab_size, vp)]
    for stack, layers in ((ENCODER, c.num_layers), (DECODER, c.decoder_layers)):
        hf_stack = stack.rstrip(".")
        maps.append(identity_mapping(
            stack + RELATIVE_POSITION_BIAS,
            f"{hf_stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        for i in range(layers):
            m, h = stack + layer_prefix(i), f"{hf_stack}.block.{i}.layer."
            maps += [
                identity_mapping(f"{m}{INPUT_NORM}.weight", h + "0.layer_norm.weight"),
                ParamMapping(f"{m}{LINEAR_QKV}.weight",
                             tuple(f"{h}0.SelfAttention.{p}.weight" for p in "qkv"),
                             lambda t: grouped_to_qkv(t, a, a, d),
                             lambda q, k, v: qkv_to_grouped(q, k, v, a)),
                identity_mapping(f"{m}{LINEAR_PROJ}.weight", h + "0.SelfAttention.o.weight")]
            mlp = h + "1."
            if stack == DECODER:
                mlp = h + "2."
                maps += [
                    identity_mapping(f"{m}{CROSS_ATTENTION_NORM}.weight",
                                     h + "1.layer_norm.weight"),
                    identity_mapping(f"{m}{CROSS_LINEAR_Q}.weight",
                                     h + "1.EncDecAttention.q.weight"),
                    ParamMapping(f"{m}{CROSS_LINEAR_KV}.weight",
                                 (h + "1.EncDecAttention.k.weight",
                                  h + "1.EncDecAttention.v.weight"),
                                 lambda t: _split_kv(t, a, d),
                                 lambda k, v: _join_kv(k, v, a)),
                    identity_mapping(f"{m}{CROSS_LINEAR_PROJ}.weight",
                                     h + "1.EncDecAttention.o.weight")]
            maps.append(identity_mapping(f"{m}{POST_ATTENTION_NORM}.weight",
                                         mlp + "layer_norm.weight"))
            if c.activation == "geglu":
                maps.append(ParamMapping(
                    f"{m}{LINEAR_FC1}.weight",
                    (mlp + "DenseReluDense.wi_0.weight", mlp + "DenseReluDense.wi_1.weight"),
                    lambda t: tuple(x.contiguous() for x in torch.split(t, f, dim=0)),
                    lambda gate, up: torch.cat([gate, up], dim=0)))
            else:
                maps.append(identity_mapping(f"{m}{LINEAR_FC1}.weight",
                                             mlp + "DenseReluDense.wi.weight"))
            maps.append(identity_mapping(f"{m}{LINEAR_FC2}.weight",
                                         mlp + "DenseReluDense.wo.weight"))
        maps.append(identity_mapping(f"{stack}{FINAL_NORM}.weight",
                                     f"{hf_stack}.final_layer_norm.weight"))
    if not c.tied_embeddings:
        maps.append(vocab_mapping(OUTPUT_LAYER, "lm_head.weight", c.vocab_size, vp))
    return maps


def _split_kv(t: Tensor, heads: int, d: int) -> tuple[Tensor, Tensor]:
    """[k_0; v_0; k_1; v_1; ...] (d rows each) -> (k, v) [heads d, h] each."""
    kv = t.reshape(heads, 2, d, *t.shape[1:])
    return (kv[:, 0].reshape(heads * d, *t.shape[1:]).contiguous(),
            kv[:, 1].reshape(heads * d, *t.shape[1:]).contiguous())


def _join_kv(k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Inverse of :func:`_split_kv`."""
    pair = torch.stack([k.reshape(heads, -1, *k.shape[1:]), v.reshape(heads, -1, *v.shape[1:])],
                       dim=1)
    return pair.reshape(-1, *k.shape[1:]).contiguous()


def _check(config: TransformerConfig) -> None:
    c = config
    if c.model_type == "t5" and c.position_embedding_type != "relative":
        raise MegaliteError("this encoder-decoder config has no exact Hugging Face counterpart "
                            "(T5 needs position_embedding_type 'relative'; the original "
                            "Transformer's sinusoidal recipe has none)")
    problems = [what for what, ok in (
        ("model_type 't5'", c.model_type == "t5"),
        ("position_embedding_type 'relative'", c.position_embedding_type == "relative"),
        ("normalization 'RMSNorm'", c.normalization == "RMSNorm"),
        ("norm_placement 'pre'", c.norm_placement == "pre"),
        ("activation 'relu' or 'geglu'", c.activation in _ACT),
        ("no biases", not c.add_bias_linear and not c.add_qkv_bias),
        ("softmax_scale 1.0", c.softmax_scale == 1.0),
        ("no grouped-query attention", c.query_groups == c.num_attention_heads),
        ("no scale_embedding", not c.scale_embedding)) if not ok]
    if problems:
        raise MegaliteError(f"T5 conversion needs {', '.join(problems)}")


def tied_in_checkpoint(names: set[str], get: Callable[[str], Tensor]) -> bool:
    """True when an HF T5 checkpoint has no separate output layer: no ``lm_head.weight``, or
    one equal to ``shared.weight``."""
    if "lm_head.weight" not in names:
        return True
    return torch.equal(get("lm_head.weight"), get("shared.weight"))


def _extra(config: TransformerConfig) -> dict[str, str]:
    out = {name: "shared.weight" for name in TIED_COPIES}
    if config.tied_embeddings:
        out["lm_head.weight"] = "shared.weight"
    return out


def to_hf(state: Mapping[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """Full megalite state dict -> ``T5ForConditionalGeneration`` state dict (tied copies
    included, so it loads with ``strict=True``)."""
    rows = state[WORD_EMBEDDINGS].shape[0] if WORD_EMBEDDINGS in state else None
    return to_hf_state_dict(state, param_mappings(config, rows), _extra(config))


def from_hf(hf_state: Mapping[str, Tensor], config: TransformerConfig,
            padded_vocab: int | None = None) -> dict[str, Tensor]:
    """``T5ForConditionalGeneration`` state dict -> full megalite state dict."""
    ignore = (*IGNORED, *_extra(config))
    return from_hf_state_dict(hf_state, param_mappings(config, padded_vocab), ignore)


def hf_architecture(config: TransformerConfig) -> str:
    """The ``transformers`` class the converted model is."""
    return "T5ForConditionalGeneration"


def extra_tensors(config: TransformerConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """Hugging Face tensors with no megalite parameter behind them: none for T5."""
    return {}


def hf_model_class(config: TransformerConfig):
    """The ``transformers`` auto class that loads the converted model (``--verify``)."""
    from transformers import AutoModelForSeq2SeqLM
    return AutoModelForSeq2SeqLM


def verify_logits(ours, theirs, tokens: Tensor, config: TransformerConfig
                  ) -> tuple[Tensor, Tensor]:
    """(megalite's, Hugging Face's) real-vocabulary logits [n, s, V]: ``tokens`` [n, s] as the
    source and, reversed, as the decoder input."""
    target = tokens.flip(-1)
    return (ours(tokens, target)[..., :config.vocab_size].float(),
            theirs(input_ids=tokens, decoder_input_ids=target).logits.float())


def ignored_names(config: TransformerConfig, names) -> tuple[str, ...]:
    """HF tensors of ``names`` the megalite model does not hold: the copies of
    ``shared.weight`` (tied ``lm_head`` included) and the unused cross-attention bias table."""
    drop = [*TIED_COPIES, *IGNORED]
    if config.tied_embeddings:
        drop.append("lm_head.weight")
    return tuple(n for n in drop if n in names)


def config_to_hf(config: TransformerConfig):
    """``transformers.T5Config`` with the same shapes (dropout: the hidden dropout)."""
    _check(config)
    from transformers import T5Config
    c = config
    return T5Config(
        vocab_size=c.vocab_size, d_model=c.hidden_size, d_kv=c.head_dim, d_ff=c.ffn_size,
        num_layers=c.num_layers, num_decoder_layers=c.decoder_layers,
        num_heads=c.num_attention_heads,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        dropout_rate=c.hidden_dropout, layer_norm_epsilon=c.layernorm_epsilon,
        feed_forward_proj=_ACT[c.activation],
        tie_word_embeddings=c.scale_decoder_outputs,     # T5Config: whether outputs are scaled
        decoder_start_token_id=c.decoder_start_token_id, pad_token_id=None, eos_token_id=None,
        architectures=["T5ForConditionalGeneration"])


def config_from_hf(hf, names=None, get: Callable[[str], Tensor] | None = None
                   ) -> TransformerConfig:
    """:class:`TransformerConfig` from a ``transformers.T5Config``; the checkpoint's tensor
    ``names`` and ``get`` (name -> tensor) tell whether it shares the output layer with the
    embedding (:func:`tied_in_checkpoint`); without them T5's convention holds, tied exactly
    when the outputs are scaled."""
    act = getattr(hf, "feed_forward_proj", "relu")
    ours = {"relu": "relu", "gated-gelu": "geglu"}.get(act)
    if ours is None:
        raise MegaliteError(f"T5 config: feed_forward_proj={act!r} is not supported (relu "
                            f"and gated-gelu are)")
    scaled = bool(getattr(hf, "scale_decoder_outputs", True))
    tied = scaled
    if names is not None:
        tied = "lm_head.weight" not in names or (get is not None and
                                                 tied_in_checkpoint(set(names), get))
    heads, d = hf.num_heads, hf.d_kv
    dropout = float(getattr(hf, "dropout_rate", 0.0) or 0.0)
    return TransformerConfig(
        model_type="t5", num_layers=hf.num_layers,
        decoder_num_layers=(None if hf.num_decoder_layers in (None, hf.num_layers)
                            else hf.num_decoder_layers),
        hidden_size=hf.d_model, num_attention_heads=heads, vocab_size=hf.vocab_size,
        ffn_hidden_size=hf.d_ff, kv_channels=None if heads * d == hf.d_model else d,
        max_position_embeddings=512, position_embedding_type="relative",
        relative_attention_num_buckets=hf.relative_attention_num_buckets,
        relative_attention_max_distance=hf.relative_attention_max_distance,
        normalization="RMSNorm", layernorm_epsilon=hf.layer_norm_epsilon, activation=ours,
        add_bias_linear=False, softmax_scale=1.0, scale_decoder_outputs=scaled,
        untie_embeddings_and_output_weights=not tied,
        hidden_dropout=dropout, attention_dropout=dropout,
        decoder_start_token_id=getattr(hf, "decoder_start_token_id", None))
