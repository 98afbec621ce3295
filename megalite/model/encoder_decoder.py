"""The encoder-decoder family (``model_type="t5"``): T5 (v1.0, v1.1) and the original
Transformer, one module whose differences are config switches.

    m      = Encoder(dropout(E[src] + P))          bidirectional self-attention, source padding
    y      = Decoder(dropout(E[tgt] + P), m)       causal self-attention, then cross-attention to m
    logits = y W_out^T  (y * h^-0.5 when scale_decoder_outputs)      W_out = E when tied

Each stack is ``num_layers`` (decoder: ``decoder_num_layers``) :class:`TransformerLayer` s and a
final norm; the word embedding E is shared by both stacks and, tied, by the output layer.

===============================  =========================  ==================================
switch                           T5 v1.0 / v1.1             original Transformer (nn.Transformer)
===============================  =========================  ==================================
position_embedding_type          relative (one bias table   sinusoidal, added to E[ids]
                                 per stack, shared by its   (scale_embedding: E * sqrt(h))
                                 layers)
normalization / norm_placement   RMSNorm / pre              LayerNorm / post
activation                       relu / geglu               relu
add_bias_linear                  False                      True
softmax_scale                    1.0                        None (1/sqrt(d))
tied output / scaled outputs     v1.0 yes, yes; v1.1 no, no yes, no
===============================  =========================  ==================================

Masks: ``enc_mask`` [b, t] and ``dec_mask`` [b, s] (1 for a token, 0 for padding, as the T5
dataset gives them) hide padding *keys*: the encoder's self-attention and the decoder's
cross-attention do not see source padding, the decoder's self-attention neither target padding
nor later tokens. The outputs at padding positions are computed but meaningless (the loss mask
drops them). Without masks or a position bias the attention takes SDPA's unmasked / causal fast
path, as GPT's does; otherwise one additive mask per stack (position bias + the dtype's most
negative value at hidden keys), computed once per forward for all layers.

Tensor and sequence parallelism as in GPT (heads, FFN and vocabulary split; the relative bias
table split by heads). Pipeline parallelism is not implemented for this family.

Generation (:mod:`megalite.inference.seq2seq`): :meth:`encode` once, then :meth:`decode` with a
KV cache of the decoder's self-attention; the cross-attention keys/values are computed from the
encoder output by the first step and kept in the cache.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megalite.errors import MegaliteError
from megalite.inference.kv_cache import cache_offset
from megalite.model.config import TransformerConfig
from megalite.model.norms import build_norm
from megalite.model.positions import RelativePositionBias
from megalite.model.transformer import Embedding, ModelChunk, TransformerLayer
from megalite.parallel.context import ModelContext
from megalite.parallel.layers import ColumnParallelLinear
from megalite.parallel.random import checkpoint

__all__ = ["EncoderDecoderModel", "TransformerStack", "key_padding_mask"]


def key_padding_mask(keep: Tensor | None, dtype: torch.dtype,
                     base: Tensor | None = None) -> Tensor | None:
    """Additive attention mask from ``keep`` [b, k] (nonzero: a token) on top of ``base``
    (broadcastable to [b, a, q, k], e.g. a position bias; None: zeros): hidden keys get the
    dtype's most negative value. None when there is nothing to add."""
    if keep is None:
        return base
    hidden = (keep == 0)[:, None, None, :]                               # [b, 1, 1, k]
    if base is None:
        base = torch.zeros((), dtype=dtype, device=keep.device)
    return base.masked_fill(hidden, torch.finfo(dtype).min)


class TransformerStack(nn.Module):
    """The encoder (``decoder=False``) or the decoder of an encoder-decoder model:
    ``forward(x [s, b, h], keep [b, s] | None, ...) -> Norm(layers(x)) [s, b, h]``
    (SP: [s/tp, b, h])."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, decoder: bool):
        super().__init__()
        self.config, self.ps, self.rng_tracker = config, ctx.ps, ctx.rng_tracker
        self.decoder = decoder
        if config.position_embedding_type == "relative":
            self.relative_position_bias = RelativePositionBias(config, ctx,
                                                               bidirectional=not decoder)
        count = config.decoder_layers if decoder else config.num_layers
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(config, ctx, causal=decoder, cross_attention=decoder)
            for i in range(count)})
        self.final_norm = build_norm(config, ctx)

    def self_attention_mask(self, keep: Tensor | None, queries: int, offset: int,
                            dtype: torch.dtype, device) -> Tensor | None:
        """The additive mask of ``queries`` queries at positions ``offset ..`` over the
        ``offset + queries`` keys, or None (SDPA's own causal/unmasked path)."""
        q_pos = torch.arange(offset, offset + queries, device=device)
        k_pos = torch.arange(offset + queries, device=device)
        bias = None
        if hasattr(self, "relative_position_bias"):
            bias = self.relative_position_bias(q_pos, k_pos).to(dtype)      # [1, a/tp, q, k]
        if bias is None and keep is None:
            return None
        if self.decoder and queries > 1:     # the causal part, now that a mask is explicit
            base = bias if bias is not None else torch.zeros((), dtype=dtype, device=device)
            bias = base.masked_fill(k_pos[None, :] > q_pos[:, None], torch.finfo(dtype).min)
        return key_padding_mask(keep, dtype, bias)

    def forward(self, x: Tensor, keep: Tensor | None, *, memory: Tensor | None = None,
                memory_keep: Tensor | None = None, kv_cache=None, offset: int = 0) -> Tensor:
        """``x``: embedded tokens; ``keep``: this stack's token mask [b, s] (decoder: of all
        ``offset + s`` positions when a cache holds ``offset``); ``memory``/``memory_keep``:
        the encoder output and the source token mask (decoder only)."""
        sp = self.config.sequence_parallel and self.ps.tp_size > 1
        s = x.shape[0] * (self.ps.tp_size if sp else 1)
        mask = self.self_attention_mask(keep, s, offset, x.dtype, x.device)
        memory_mask = key_padding_mask(memory_keep, x.dtype) if self.decoder else None
        full_recompute = (self.config.recompute_granularity == "full"
                          and torch.is_grad_enabled() and kv_cache is None)
        for i, layer in self.layers.items():
            cache = None if kv_cache is None else kv_cache.layer(int(i))
            if full_recompute:
                x = checkpoint(layer, self.rng_tracker, x, None, None, None, mask, memory,
                               memory_mask)
            else:
                x = layer(x, None, None, cache, mask, memory, memory_mask)
        return self.final_norm(x)


class EncoderDecoderModel(ModelChunk):
    """Encoder-decoder model, tensor/sequence parallel, whole on each rank (no pipeline).

    Args: ``config`` (``model_type="t5"``) and ``ctx`` as for
    :class:`~megalite.model.transformer.ModelChunk`; ``pre_process``, ``post_process`` and
    ``layer_range`` are there for :func:`~megalite.parallel.pipeline.stages.build_model_chunks`
    and must describe the whole model. Parameter names: ``embedding.*``,
    ``encoder.relative_position_bias.weight``, ``encoder.layers.{i}.*``,
    ``encoder.final_norm.weight``, the same under ``decoder.`` (whose layers add
    ``cross_attention_norm`` and ``cross_attention.linear_{q,kv,proj}``), and
    ``output_layer.weight`` when untied. Built on meta and initialized once, as GPTModel.
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, pre_process: bool = True,
                 post_process: bool = True, layer_range: tuple[int, int] | None = None):
        if not config.is_encoder_decoder:
            raise MegaliteError(f"EncoderDecoderModel needs model_type 't5', got "
                                f"{config.model_type!r}")
        whole = layer_range in (None, (0, config.num_layers))
        if ctx.ps.pp_size > 1 or not (pre_process and post_process and whole):
            raise MegaliteError("the encoder-decoder (T5) model has no pipeline-parallel "
                                "implementation: use --pipeline-model-parallel-size 1")
        super().__init__(config, ctx, pre_process=True, post_process=True, layer_range=None)
        meta = ctx.on_meta()
        self.embedding = Embedding(config, meta)
        self.encoder = TransformerStack(config, meta, decoder=False)
        self.decoder = TransformerStack(config, meta, decoder=True)
        if not config.tied_embeddings:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, self.padded_vocab, meta, bias=False, gather_output=False,
                sequence_parallel=self.sequence_parallel)
        self._materialize(ctx)

    def forward_microbatch(self, hidden, microbatch: dict) -> Tensor:
        """The pipeline schedule's call (:mod:`megalite.families`; one stage, so ``hidden`` is
        None): the T5 data's ``text_enc``, ``text_dec``, ``labels``, ``enc_mask`` and
        ``dec_mask`` -> the per-token loss [b, s] (the loss object applies ``loss_mask``)."""
        mb = microbatch
        return self(mb["text_enc"], mb["text_dec"], mb["labels"], enc_mask=mb["enc_mask"],
                    dec_mask=mb["dec_mask"])

    def forward(self, enc_ids: Tensor, dec_ids: Tensor, labels: Tensor | None = None, *,
                enc_mask: Tensor | None = None, dec_mask: Tensor | None = None) -> Tensor:
        """Source ids [b, t] and decoder input ids [b, s] (masks: 1 token, 0 padding) -> the
        logits [b, s, Vp/tp] of this rank's vocabulary slice (padding columns masked), or with
        ``labels`` [b, s] the per-token cross-entropy [b, s] (fp32; the caller masks padding)."""
        memory = self.encode(enc_ids, enc_mask)
        return self.decode(dec_ids, memory, enc_mask, labels, dec_mask=dec_mask)

    def encode(self, enc_ids: Tensor, enc_mask: Tensor | None = None) -> Tensor:
        """Source ids [b, t] -> encoder output [t, b, h] (SP: [t/tp, b, h])."""
        self._check_ids(enc_ids, "encoder", 0)
        return self.encoder(self.embedding(enc_ids), enc_mask)

    def decode(self, dec_ids: Tensor, memory: Tensor, enc_mask: Tensor | None = None,
               labels: Tensor | None = None, *, dec_mask: Tensor | None = None,
               kv_cache=None) -> Tensor:
        """Decoder input ids [b, s] attending to ``memory`` (:meth:`encode`'s output) -> logits
        or loss as :meth:`forward`. ``kv_cache`` (inference,
        :class:`~megalite.inference.kv_cache.KVCache` of the decoder): the s tokens sit at
        positions ``kv_cache.offset ..``; ``dec_mask`` then covers all offset + s positions."""
        offset = cache_offset(kv_cache, self.sequence_parallel)
        self._check_ids(dec_ids, "decoder", offset)
        y = self.decoder(self.embedding(dec_ids, offset), dec_mask, memory=memory,
                         memory_keep=enc_mask, kv_cache=kv_cache, offset=offset)
        if kv_cache is not None:
            kv_cache.advance(dec_ids.shape[1])
        if self.config.scale_decoder_outputs:
            y = y * self.config.hidden_size ** -0.5
        return self._lm_output(self._logits(y), labels)

    def _check_ids(self, ids: Tensor, what: str, offset: int) -> None:
        if ids.dim() != 2:
            raise MegaliteError(f"the {what} expects token ids [batch, seq], got shape "
                                f"{tuple(ids.shape)}")
        s, c = ids.shape[1] + offset, self.config
        if c.position_embedding_type != "relative" and s > c.max_position_embeddings:
            raise MegaliteError(f"{what} sequence length {s} exceeds max_position_embeddings="
                                f"{c.max_position_embeddings}")
        if self.sequence_parallel and ids.shape[1] % self.ps.tp_size:
            raise MegaliteError(f"--sequence-parallel needs the {what} sequence length "
                                f"({ids.shape[1]}) divisible by the tensor-parallel size "
                                f"({self.ps.tp_size})")
