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

Padding rows are never predicted (their logits are masked, :mod:`megalite.model.embedding`);
they are initialized to zero and stay zero. The embedding and the layers are shared with the
other families (:mod:`megalite.model.embedding`, :mod:`megalite.model.transformer_layer`,
which also says how dropout draws its random numbers).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megalite.errors import MegaliteError
from megalite.inference.kv_cache import cache_offset
from megalite.model import weights
from megalite.model.config import TransformerConfig, padded_vocab_size
from megalite.model.embedding import Embedding, logits_or_loss, vocab_logits
from megalite.model.norms import build_norm
from megalite.model.positions import RotaryEmbedding
from megalite.model.transformer_layer import TransformerLayer
from megalite.parallel.context import ModelContext
from megalite.parallel.layers import ColumnParallelLinear
from megalite.parallel.random import checkpoint

__all__ = ["GPTModel", "padded_vocab_size"]


class GPTModel(weights.WeightsMixin, nn.Module):
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
        offset = cache_offset(kv_cache, self.sequence_parallel)
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
        return logits_or_loss(self._logits(self.final_norm(x)), labels, self.ps)

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
        return vocab_logits(x, self.output_weight(), self.config, self.ps,
                            self.sequence_parallel)
