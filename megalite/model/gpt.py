"""The GPT model family: one decoder-only transformer, two recipes, any tensor-parallel layout.

    x_0    = dropout(E[ids] + P)                      E: word embedding, P: learned/sinusoidal
    x'_l   = x_l  + dropout(Attention(Norm(x_l)))     (rotary positions inside attention)
    x_l+1  = x'_l + dropout(MLP(Norm(x'_l)))
    logits = Norm(x_L) W_out^T                        W_out = E when tied

Layout. Activations inside the transformer are sequence-first, [s, b, h]; with sequence
parallelism every rank holds [s/tp, b, h] between the blocks (norms, dropout and residual adds
act on the shard; the attention/MLP linears all-gather before and reduce-scatter after). The
vocabulary is padded to ``config.padded_vocab(tp)`` and split in row blocks of
``padded/tp`` over the tensor-parallel ranks (embedding and output layer alike).

Padding rows are never predicted: their logits are set to the most negative finite value of
the dtype (``torch.finfo(dtype).min``), in the returned logits and in the loss. Softmax gives
them probability exactly 0 (exp underflows) and their gradient is exactly 0; a finite value
rather than -inf keeps ``0 * logit`` free of NaN in any downstream masking. They are initialized
to zero and stay zero.

Dropout RNG: dropout on tensors split across tensor-parallel ranks (attention probabilities;
with SP also the embedding and residual-branch dropout) draws from the tracker's
"model-parallel" stream, so masks differ per rank; dropout on replicated tensors uses the default
generator, identical on all tensor-parallel ranks, so the replicas stay equal.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalite.errors import MegaliteError
from megalite.model import weights
from megalite.model.attention import Attention
from megalite.model.config import TransformerConfig, padded_vocab_size
from megalite.model.mlp import MLP
from megalite.model.norms import build_norm, mark_replicated
from megalite.model.positions import RotaryEmbedding, SinusoidalPositions
from megalite.parallel.comm import reduce_scatter_to_sequence_parallel_region
from megalite.parallel.context import ModelContext
from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding,
                                      parallel_lm_logits)
from megalite.parallel.random import RNGStatesTracker, checkpoint

__all__ = ["GPTModel", "padded_vocab_size"]


def _dropout(x: Tensor, p: float, training: bool, tracker: RNGStatesTracker, split: bool) -> Tensor:
    """Dropout drawing from the "model-parallel" stream when ``x`` is split across tp ranks."""
    if not training or p == 0.0:
        return x
    with tracker.fork() if split else contextlib.nullcontext():
        return F.dropout(x, p, training=True)


class Embedding(nn.Module):
    """Token (+ absolute position) embedding: ``forward(ids [b, s]) -> [s, b, h]``
    ([s/tp, b, h] with sequence parallelism).

    With sequence parallelism the vocabulary-parallel partial sums are reduce-scattered along the
    sequence (instead of all-reduced), and each rank adds the positions of its own sequence
    slice; the learned position table then sees only those rows, so its gradient is partial and
    it is marked ``sequence_parallel`` (summed over tp by the trainer, like the norms).
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext):
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

    def forward(self, input_ids: Tensor, position_offset: int = 0) -> Tensor:
        """``position_offset``: absolute position of ``input_ids[:, 0]`` (tokens already in an
        inference KV cache; 0 in training)."""
        s = input_ids.shape[1]
        x = self.word_embeddings(input_ids).transpose(0, 1).contiguous()   # [s, b, h]
        positions = torch.arange(position_offset, position_offset + s, device=input_ids.device)
        if self.sp:
            x = reduce_scatter_to_sequence_parallel_region(x, self.ps)     # [s/tp, b, h]
            local = s // self.ps.tp_size
            positions = positions[self.ps.tp_rank * local:(self.ps.tp_rank + 1) * local]
        kind = self.config.position_embedding_type
        if kind == "learned_absolute":
            x = x + self.position_embeddings(positions)[:, None, :]
        elif kind == "sinusoidal":
            x = x + self.sinusoidal.table[positions][:, None, :].to(x.dtype)
        return _dropout(x, self.config.hidden_dropout, self.training, self.rng_tracker,
                        split=self.sp)


class TransformerLayer(nn.Module):
    """Pre-norm block: ``forward(x [s, b, h], cos=None, sin=None, kv_cache=None) -> [s, b, h]``."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.split = config.sequence_parallel and ctx.ps.tp_size > 1
        self.rng_tracker = ctx.rng_tracker
        self.input_norm = build_norm(config, ctx)
        self.attention = Attention(config, ctx)
        self.post_attention_norm = build_norm(config, ctx)
        self.mlp = MLP(config, ctx)

    def forward(self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
                kv_cache=None) -> Tensor:
        rope = None if cos is None else (cos, sin)
        x = x + self._drop(self.attention(self.input_norm(x), rope, kv_cache))
        return x + self._drop(self.mlp(self.post_attention_norm(x)))

    def _drop(self, t: Tensor) -> Tensor:
        return _dropout(t, self.hidden_dropout, self.training, self.rng_tracker, self.split)


class GPTModel(nn.Module):
    """GPT model (or the slice of it one pipeline stage holds), tensor/sequence parallel.

    Args:
        config: model shapes and recipe.
        ctx: this rank's layout (only ``ps.tp_*`` is used here), dropout RNG streams, and the
            device (``"meta"`` to inspect shapes without memory) and dtype of the parameters
            (default torch's default, float32; init is drawn in float32 and cast, so a bf16
            model holds the rounded float32 weights). See
            :class:`~megalite.parallel.context.ModelContext`.
        pre_process: hold the embedding (first pipeline stage).
        post_process: hold the final norm and the output layer (last pipeline stage).
        layer_range: global ids ``[a, b)`` of the layers held here (default: all). Parameter
            names use global ids (``layers.7.mlp...``) on every stage.

    Every module is built on the meta device, then this rank's shards are allocated on
    ``ctx.device``: nothing is drawn at construction, and the parameters are uninitialized
    until :meth:`init_weights` (or a state dict) fills them, once (:mod:`megalite.model.weights`).
    """

    def __init__(self, config: TransformerConfig, ctx: ModelContext, *, pre_process: bool = True,
                 post_process: bool = True, layer_range: tuple[int, int] | None = None):
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

        meta = ctx.on_meta()
        if pre_process:
            self.embedding = Embedding(config, meta)
        self.rotary = (RotaryEmbedding.from_config(config)
                       if config.position_embedding_type == "rope" else None)
        # A ModuleDict keyed by the global layer id keeps state-dict names stage-independent.
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, meta)
                                     for i in range(lo, hi)})
        if post_process:
            self.final_norm = build_norm(config, meta)
            if not config.tied_embeddings or not pre_process:
                # Untied output layer, or the last stage's copy of a tied embedding (kept equal
                # to the first stage's by the pipeline's embedding-group all-reduce).
                self.output_layer = ColumnParallelLinear(
                    config.hidden_size, self.padded_vocab, meta, bias=False,
                    gather_output=False, sequence_parallel=self.sequence_parallel)
                self.output_layer.weight.shared_embedding = config.tied_embeddings
        if not ctx.is_meta:
            weights.materialize(self, ctx.resolved_device())

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, inputs: Tensor, labels: Tensor | None = None, *, kv_cache=None) -> Tensor:
        """Run this model (slice).

        inputs: token ids [b, s] when ``pre_process``; else the previous stage's hidden states
            [s, b, h] ([s/tp, b, h] with sequence parallelism).
        labels: target ids [b, s] (global vocabulary ids < vocab_size) or None.

        Returns, when ``post_process``: the logits of this rank's vocabulary slice
        [b, s, padded_vocab/tp] (padding columns masked, see module doc) if ``labels`` is None,
        else the per-token cross-entropy [b, s] (fp32, identical on all tp ranks; computed
        without gathering the logits). Without ``post_process``: hidden states [s, b, h]
        ([s/tp, b, h] with SP).

        kv_cache: inference only (:class:`megalite.inference.kv_cache.KVCache`, one per model
            chunk): the s tokens sit at absolute positions ``kv_cache.offset ..`` and attend to
            every cached token; their keys/values are appended and the offset advanced by s.
            Not with sequence parallelism.
        """
        tp = self.ps.tp_size
        offset = 0
        if kv_cache is not None:
            if self.sequence_parallel:
                raise MegaliteError("a KV cache (inference) cannot be used with sequence "
                                    "parallelism; build the model with sequence_parallel=False")
            offset = kv_cache.offset
        if self.pre_process:
            if inputs.dim() != 2:
                raise MegaliteError(f"GPTModel expects token ids [batch, seq], got shape "
                                    f"{tuple(inputs.shape)}")
            s = inputs.shape[1]
            self._check_seq(offset + s)
            x = self.embedding(inputs, offset)
        else:
            x = inputs
            s = x.shape[0] * (tp if self.sequence_parallel else 1)
            self._check_seq(offset + s)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(offset + s, device=x.device)
            cos, sin = cos[offset:], sin[offset:]             # the angles of positions offset..
        full_recompute = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        for i, layer in self.layers.items():
            if full_recompute and kv_cache is None:
                args = (x,) if cos is None else (x, cos, sin)
                x = checkpoint(layer, self.rng_tracker, *args)
            else:
                x = layer(x, cos, sin, None if kv_cache is None else kv_cache.layer(int(i)))
        if kv_cache is not None:
            kv_cache.advance(s)
        if not self.post_process:
            return x
        logits = self._logits(self.final_norm(x))               # [s, b, Vp/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        if labels.shape != logits.shape[1::-1]:
            raise MegaliteError(f"labels shape {tuple(labels.shape)} does not match the tokens "
                                f"[batch, seq] = {list(logits.shape[1::-1])}")
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.ps)  # [s, b]
        return loss.transpose(0, 1).contiguous()

    def forward_microbatch(self, hidden: Tensor | None, microbatch: dict) -> Tensor:
        """The pipeline schedule's call (:mod:`megalite.families`): ``microbatch["tokens"]``
        on the first stage (``hidden`` None), else the previous stage's ``hidden``; with
        ``microbatch["labels"]`` on the last stage (per-token loss [b, s])."""
        inputs = microbatch["tokens"] if hidden is None else hidden
        return self(inputs, labels=microbatch["labels"] if self.post_process else None)

    def _check_seq(self, s: int) -> None:
        if s > self.config.max_position_embeddings:
            raise MegaliteError(f"sequence length {s} exceeds max_position_embeddings="
                                f"{self.config.max_position_embeddings}")
        if self.sequence_parallel and s % self.ps.tp_size:
            raise MegaliteError(f"--sequence-parallel needs the sequence length ({s}) divisible "
                                f"by the tensor-parallel size ({self.ps.tp_size})")

    def output_weight(self) -> Tensor:
        """This rank's [padded_vocab/tp, h] slice of the output matrix (tied or not)."""
        if hasattr(self, "output_layer"):
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def _logits(self, x: Tensor) -> Tensor:
        """[s, b, h] (SP: [s/tp, b, h]) -> [s, b, Vp/tp] logits of this rank's vocab slice."""
        # all-gathers the sequence under SP (backward: reduce-scatter), else identity forward
        # and all-reduce backward.
        logits = parallel_lm_logits(x, self.output_weight(), self.ps,
                                    sequence_parallel=self.sequence_parallel)
        local = self.padded_vocab // self.ps.tp_size
        valid = self.config.vocab_size - self.ps.tp_rank * local   # real rows in this slice
        if valid < local:
            mask = torch.arange(local, device=logits.device) >= valid
            logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
        return logits

    # ---- weights (megalite.model.weights) --------------------------------------------------
    def to_empty(self, *, device, recurse: bool = True) -> "GPTModel":
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
