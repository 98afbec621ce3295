"""What the model families share: the embedding, the transformer layer and the base classes of
a model chunk (output logits, weights lifecycle; the layers of one pipeline stage).

Layer, in the two norm placements (``TransformerConfig.norm_placement``)::

    pre  (GPT, Megatron's BERT, T5):  x' = x  + dropout(Attention(Norm1(x)))
                                      y  = x' + dropout(MLP(Norm2(x')))
    post (the original BERT and       x' = Norm1(x  + dropout(Attention(x)))
          Transformer):               y  = Norm2(x' + dropout(MLP(x')))

Norm1 is ``input_norm`` and Norm2 ``post_attention_norm`` in both placements (the attention's
and the MLP's norm); a decoder layer of an encoder-decoder has a cross-attention sublayer
between them, with its ``cross_attention_norm``. Attention is causal (GPT) or bidirectional
with an optional key padding mask (BERT), or takes a mask holding T5's position bias.

Dropout RNG: dropout on tensors split across tensor-parallel ranks (attention probabilities;
with SP also the embedding and residual-branch dropout) draws from the tracker's
"model-parallel" stream, so masks differ per rank; dropout on replicated tensors uses the default
generator, identical on all tensor-parallel ranks, so the replicas stay equal.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalite.errors import MegaliteError
from megalite.model import weights
from megalite.model.attention import Attention, CrossAttention
from megalite.model.config import TransformerConfig
from megalite.model.mlp import MLP
from megalite.model.moe import MoELayer
from megalite.model.norms import build_norm, mark_replicated
from megalite.model.positions import RotaryEmbedding, SinusoidalPositions
from megalite.parallel.comm import reduce_scatter_to_sequence_parallel_region
from megalite.parallel.context import ModelContext
from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.layers import VocabParallelEmbedding, parallel_lm_logits
from megalite.parallel.random import RNGStatesTracker, checkpoint, eager

__all__ = ["dropout", "Embedding", "TransformerLayer", "ModelChunk", "TransformerModelBase"]


def dropout(x: Tensor, p: float, training: bool, tracker: RNGStatesTracker, split: bool) -> Tensor:
    """Dropout drawing from the "model-parallel" stream when ``x`` is split across tp ranks."""
    if not training or p == 0.0:
        return x
    return eager(_dropout, x, p, tracker, split)   # eager masks under --compile too


def _dropout(x: Tensor, p: float, tracker: RNGStatesTracker, split: bool) -> Tensor:
    with tracker.fork() if split else contextlib.nullcontext():
        return F.dropout(x, p, training=True)


class Embedding(nn.Module):
    """Token (+ absolute position, + token type) embedding: ``forward(ids [b, s],
    position_offset=0, tokentype_ids=None [b, s]) -> [s, b, h]`` ([s/tp, b, h] with sequence
    parallelism), then a norm when ``norm`` (post-norm BERT) and dropout. With
    ``config.scale_embedding`` (the original Transformer) the word embeddings are multiplied by
    sqrt(h) before anything is added; rotary and relative positions add nothing here.

    With sequence parallelism the vocabulary-parallel partial sums are reduce-scattered along the
    sequence (instead of all-reduced), and each rank adds the positions (and token types) of its
    own sequence slice; the learned position and token-type tables then see only those rows, so
    their gradient is partial and they are marked ``sequence_parallel`` (summed over tp by the
    trainer, like the norms).
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, num_tokentypes: int = 0,
                 norm: bool = False):
        super().__init__()
        ps = ctx.ps
        self.config, self.ps, self.rng_tracker = config, ps, ctx.rng_tracker
        self.sp = config.sequence_parallel and ps.tp_size > 1
        h = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.padded_vocab(ps.tp_size), h, ctx,
                                                      reduce_output=not self.sp)
        kind = config.position_embedding_type
        if kind == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, h,
                                                    device=ctx.device, dtype=ctx.dtype)
            mark_replicated(self.position_embeddings, sequence_parallel=self.sp)
        elif kind == "sinusoidal":
            self.sinusoidal = SinusoidalPositions(config.max_position_embeddings, h,
                                                  device=ctx.device)
        if num_tokentypes:
            self.tokentype_embeddings = nn.Embedding(num_tokentypes, h, device=ctx.device,
                                                     dtype=ctx.dtype)
            mark_replicated(self.tokentype_embeddings, sequence_parallel=self.sp)
        if norm:
            self.norm = build_norm(config, ctx)

    def _local(self, t: Tensor) -> Tensor:
        """This rank's sequence slice of a [s, ...] tensor under SP (else ``t``)."""
        if not self.sp:
            return t
        local = t.shape[0] // self.ps.tp_size
        return t[self.ps.tp_rank * local:(self.ps.tp_rank + 1) * local]

    def forward(self, input_ids: Tensor, position_offset: int = 0,
                tokentype_ids: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """``position_offset``: absolute position of ``input_ids[:, 0]`` (tokens already in an
        inference KV cache; 0 in training). ``tokentype_ids`` [b, s]: ids below the table's
        size (None: type 0 everywhere), used when the embedding has a token-type table.
        ``position_ids`` [b, s]: per-token positions instead (packed documents,
        :mod:`megalite.model.doc_attention`)."""
        s = input_ids.shape[1]
        x = self.word_embeddings(input_ids).transpose(0, 1).contiguous()   # [s, b, h]
        if position_ids is None:
            positions = self._local(torch.arange(position_offset, position_offset + s,
                                                 device=input_ids.device))[:, None]  # [s, 1]
        else:
            positions = self._local(position_ids.t())                          # [s, b]
        if self.sp:
            x = reduce_scatter_to_sequence_parallel_region(x, self.ps)     # [s/tp, b, h]
        if self.config.scale_embedding:
            x = x * math.sqrt(self.config.hidden_size)
        kind = self.config.position_embedding_type
        if kind == "learned_absolute":
            x = x + self.position_embeddings(positions)
        elif kind == "sinusoidal":
            x = x + self.sinusoidal.table[positions].to(x.dtype)
        if hasattr(self, "tokentype_embeddings"):
            if tokentype_ids is None:
                tokentype_ids = torch.zeros_like(input_ids)
            x = x + self.tokentype_embeddings(self._local(tokentype_ids.transpose(0, 1)))
        if hasattr(self, "norm"):
            x = self.norm(x)
        return dropout(x, self.config.hidden_dropout, self.training, self.rng_tracker,
                       split=self.sp)


class TransformerLayer(nn.Module):
    """``forward(x [s, b, h], cos=None, sin=None, kv_cache=None, attention_mask=None,
    memory=None, memory_mask=None) -> [s, b, h]``; pre- or post-norm (module doc); ``causal``
    self-attention or not, with ``attention_mask`` (:mod:`megalite.model.attention`) when given.

    ``moe``: a mixture-of-experts layer (:class:`~megalite.model.moe.MoELayer` as its ``mlp``).
    ``cross_attention``: a decoder layer of an encoder-decoder model, whose cross-attention
    (``cross_attention_norm``, ``cross_attention``; between the self-attention and the MLP)
    attends to ``memory`` (the encoder output [t, b, h]) under ``memory_mask``. With a
    ``kv_cache`` (inference) its keys/values are computed from ``memory`` the first time and
    kept in the cache.
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, causal: bool = True,
                 cross_attention: bool = False, moe: bool = False):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.post_norm = config.norm_placement == "post"
        self.split = config.sequence_parallel and ctx.ps.tp_size > 1
        self.rng_tracker = ctx.rng_tracker
        self.input_norm = build_norm(config, ctx)
        self.attention = Attention(config, ctx, causal=causal)
        if cross_attention:
            self.cross_attention_norm = build_norm(config, ctx)
            self.cross_attention = CrossAttention(config, ctx)
        self.post_attention_norm = build_norm(config, ctx)
        # an MoE layer (--moe-layer-freq) has experts instead of the dense MLP
        self.mlp = MoELayer(config, ctx) if moe else MLP(config, ctx)

    def forward(self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
                kv_cache=None, attention_mask: Tensor | None = None,
                memory: Tensor | None = None, memory_mask: Tensor | None = None) -> Tensor:
        rope = None if cos is None else (cos, sin)
        x = self._sublayer(x, self.input_norm,
                           lambda h: self.attention(h, rope, kv_cache, attention_mask))
        if hasattr(self, "cross_attention"):
            kv = self._memory_kv(memory, kv_cache)
            x = self._sublayer(x, self.cross_attention_norm,
                               lambda h: self.cross_attention(h, kv, memory_mask))
        return self._sublayer(x, self.post_attention_norm, self.mlp)

    def _memory_kv(self, memory: Tensor | None, kv_cache) -> tuple[Tensor, Tensor]:
        cached = None if kv_cache is None else kv_cache.cross
        if cached is not None:
            return cached
        if memory is None:
            raise MegaliteError("a decoder layer needs the encoder output (memory) or cached "
                                "cross-attention keys/values")
        kv = self.cross_attention.key_values(memory)
        if kv_cache is not None:
            kv_cache.cross = kv
        return kv

    def _sublayer(self, x: Tensor, norm: nn.Module, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.post_norm:
            return norm(x + self._drop(fn(x)))
        return x + self._drop(fn(norm(x)))

    def _drop(self, t: Tensor) -> Tensor:
        return dropout(t, self.hidden_dropout, self.training, self.rng_tracker, self.split)


class ModelChunk(nn.Module):
    """What every model chunk has (a subclass adds its modules on the meta device, then calls
    :meth:`_materialize`): the config and layout, the vocabulary logits and output, the weights
    lifecycle.

    Args:
        config: model shapes and recipe.
        ctx: this rank's layout (only ``ps.tp_*`` is used here), dropout RNG streams, and the
            device (``"meta"`` to inspect shapes without memory) and dtype of the parameters
            (see :class:`~megalite.parallel.context.ModelContext`).
        pre_process: hold the embedding (first pipeline stage).
        post_process: hold the output heads (last pipeline stage).
        layer_range: global ids ``[a, b)`` of the layers held here (default: all). Parameter
            names use global ids (``layers.7.mlp...``) on every stage.

    Every module is built on the meta device, then this rank's shards are allocated on
    ``ctx.device``: nothing is drawn at construction, and the parameters are uninitialized
    until :meth:`init_weights` (or a state dict) fills them, once (:mod:`megalite.model.weights`).
    The vocabulary is padded to ``config.padded_vocab(tp)``; padding rows are never predicted
    (:meth:`_logits`).
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, pre_process: bool,
                 post_process: bool, layer_range: tuple[int, int] | None):
        super().__init__()
        ps = ctx.ps
        config.validate()
        config.validate_parallel(ps.tp_size)
        lo, hi = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= lo <= hi <= config.num_layers:
            raise MegaliteError(f"layer_range {layer_range} is not within [0, "
                                f"{config.num_layers}] (num_layers)")
        self.config, self.ps, self.rng_tracker = config, ps, ctx.rng_tracker
        self.pre_process, self.post_process, self.layer_range = pre_process, post_process, (lo, hi)
        self.padded_vocab = config.padded_vocab(ps.tp_size)
        self.sequence_parallel = config.sequence_parallel and ps.tp_size > 1

    def _materialize(self, ctx: ModelContext) -> None:
        """Allocate this rank's shards on ``ctx.device`` (the subclass built on meta)."""
        if not ctx.is_meta:
            weights.materialize(self, ctx.resolved_device())

    def output_weight(self) -> Tensor:
        """This rank's [padded_vocab/tp, h] slice of the output matrix (tied or not)."""
        if hasattr(self, "output_layer"):
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def _logits(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """[s, b, h] (SP: [s/tp, b, h]) -> [s, b, Vp/tp] logits of this rank's vocab slice
        (plus this rank's slice of ``bias``), the padding columns set to the dtype's most
        negative finite value: softmax gives them exactly 0 and their gradient is 0."""
        # all-gathers the sequence under SP (backward: reduce-scatter), else identity forward
        # and all-reduce backward.
        logits = parallel_lm_logits(x, self.output_weight(), self.ps,
                                    sequence_parallel=self.sequence_parallel, bias=bias)
        local = self.padded_vocab // self.ps.tp_size
        valid = self.config.vocab_size - self.ps.tp_rank * local   # real rows in this slice
        if valid < local:
            mask = torch.arange(local, device=logits.device) >= valid
            logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
        return logits

    def _lm_output(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        """Logits [s, b, Vp/tp] -> [b, s, Vp/tp] when ``labels`` is None, else the per-token
        cross-entropy [b, s] against ``labels`` [b, s] (fp32, identical on all tp ranks;
        computed without gathering the logits; a label outside the vocabulary, such as BERT's
        -1 at unmasked positions, gives a finite value the loss masks out)."""
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        if labels.shape != logits.shape[1::-1]:
            raise MegaliteError(f"labels shape {tuple(labels.shape)} does not match the tokens "
                                f"[batch, seq] = {list(logits.shape[1::-1])}")
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.ps)  # [s, b]
        return loss.transpose(0, 1).contiguous()

    # ---- weights (megalite.model.weights) --------------------------------------------------
    def to_empty(self, *, device, recurse: bool = True) -> "ModelChunk":
        """``nn.Module.to_empty`` keeping the parameters' sharding attributes
        (:func:`~megalite.model.weights.to_empty_keeping_attributes`). Follow with
        :meth:`init_weights` or :meth:`load_full_state_dict`."""
        return weights.to_empty_keeping_attributes(self, device, recurse=recurse)

    def init_weights(self, seed: int) -> None:
        """Layout-independent init from ``seed`` (:func:`megalite.model.weights.init_weights`)."""
        weights.init_weights(self, seed)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every parameter gathered to its full shape, on every tp rank (collective over the tp
        group; :func:`megalite.model.weights.full_state_dict`)."""
        return weights.full_state_dict(self)

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy this rank's shard of each full tensor in ``state`` into the parameters
        (:func:`megalite.model.weights.load_full_state_dict`)."""
        weights.load_full_state_dict(self, state)


class TransformerModelBase(ModelChunk):
    """A model chunk of one stack: the transformer layers ``layer_range`` of one pipeline stage
    (arguments of :class:`ModelChunk`, and ``causal``: causal self-attention (decoders) or
    bidirectional (encoders)), run by :meth:`_run_layers`. A subclass adds its embedding, calls
    :meth:`_add_layers`, adds its heads, then calls :meth:`_materialize`.
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, pre_process: bool,
                 post_process: bool, layer_range: tuple[int, int] | None, causal: bool):
        super().__init__(config, ctx, pre_process=pre_process, post_process=post_process,
                         layer_range=layer_range)
        self.rotary = (RotaryEmbedding.from_config(config)
                       if config.position_embedding_type == "rope" else None)
        self.causal = causal

    def _add_layers(self, ctx: ModelContext) -> None:
        """Build this chunk's transformer layers on the meta device. A subclass calls it after
        its embedding and before its heads, so parameters register in the model's order
        (the optimizer, gradient-norm and ZeRO orders follow it)."""
        # A ModuleDict keyed by the global layer id keeps state-dict names stage-independent.
        lo, hi = self.layer_range
        meta = ctx.on_meta()
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(self.config, meta, self.causal,
                                     moe=self.config.is_moe_layer(i))
            for i in range(lo, hi)})

    def _run_layers(self, x: Tensor, s: int, offset: int = 0, kv_cache=None,
                    attention_mask=None, position_ids: Tensor | None = None) -> Tensor:
        """This chunk's layers over ``x`` [s, b, h] ([s/tp, b, h] with SP) of a sequence of
        ``s`` tokens at absolute positions ``offset..`` (or at ``position_ids`` [b, s]: packed
        documents); full recompute when configured."""
        cos = sin = None
        if self.rotary is not None and position_ids is not None:
            cos, sin = self.rotary.at(position_ids)
        elif self.rotary is not None:
            cos, sin = self.rotary(offset + s, device=x.device)
            cos, sin = cos[offset:], sin[offset:]             # the angles of positions offset..
        full_recompute = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        for i, layer in self.layers.items():
            if full_recompute and kv_cache is None:
                x = checkpoint(layer, self.rng_tracker, x, cos, sin, None, attention_mask)
            else:
                x = layer(x, cos, sin, None if kv_cache is None else kv_cache.layer(int(i)),
                          attention_mask)
        return x

    def _seq_of(self, inputs: Tensor, what: str) -> int:
        """The sequence length of this chunk's input: token ids [b, s] on the first stage,
        else hidden states [s, b, h] ([s/tp, b, h] with SP)."""
        if self.pre_process:
            if inputs.dim() != 2:
                raise MegaliteError(f"{what} expects token ids [batch, seq], got shape "
                                    f"{tuple(inputs.shape)}")
            return inputs.shape[1]
        return inputs.shape[0] * (self.ps.tp_size if self.sequence_parallel else 1)

    def _cp_positions(self, s: int, device) -> Tensor | None:
        """Context parallelism: the global positions [s] of this rank's ``s`` tokens (its two
        chunks of a sequence of ``s * cp``); None without it."""
        if self.ps.cp_size == 1:
            return None
        from megalite.parallel.context_parallel import local_indices

        return local_indices(s * self.ps.cp_size, self.ps.cp_size, self.ps.cp_rank, device)

    def _check_seq(self, s: int) -> None:
        if s > self.config.max_position_embeddings:
            raise MegaliteError(f"sequence length {s} exceeds max_position_embeddings="
                                f"{self.config.max_position_embeddings}")
        if self.sequence_parallel and s % self.ps.tp_size:
            raise MegaliteError(f"--sequence-parallel needs the sequence length ({s}) divisible "
                                f"by the tensor-parallel size ({self.ps.tp_size})")
