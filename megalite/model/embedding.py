"""The ends of every model: the token embedding (+ absolute positions) and the output logits
over a vocabulary split across tensor-parallel ranks.

The vocabulary is padded to ``config.padded_vocab(tp)`` and split in row blocks of
``padded/tp`` over the tensor-parallel ranks (embedding and output layer alike). Padding rows
are never predicted: their logits are set to the most negative finite value of the dtype
(``torch.finfo(dtype).min``), in the returned logits and in the loss. Softmax gives them
probability exactly 0 (exp underflows) and their gradient is exactly 0; a finite value rather
than -inf keeps ``0 * logit`` free of NaN in any downstream masking.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.norms import mark_replicated
from megalite.model.positions import SinusoidalPositions
from megalite.model.transformer_layer import dropout
from megalite.parallel.comm import reduce_scatter_to_sequence_parallel_region
from megalite.parallel.context import ModelContext
from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.layers import VocabParallelEmbedding, parallel_lm_logits

__all__ = ["Embedding", "vocab_logits", "logits_or_loss"]


class Embedding(nn.Module):
    """Token (+ absolute position) embedding: ``forward(ids [b, s]) -> [s, b, h]``
    ([s/tp, b, h] with sequence parallelism).

    With ``config.scale_embedding`` the word embeddings are multiplied by sqrt(h) before the
    positions are added; rotary and relative positions act inside attention (nothing added).

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
        if self.config.scale_embedding:
            x = x * math.sqrt(self.config.hidden_size)
        kind = self.config.position_embedding_type
        if kind == "learned_absolute":
            x = x + self.position_embeddings(positions)[:, None, :]
        elif kind == "sinusoidal":
            x = x + self.sinusoidal.table[positions][:, None, :].to(x.dtype)
        return dropout(x, self.config.hidden_dropout, self.training, self.rng_tracker,
                       split=self.sp)


def vocab_logits(x: Tensor, weight: Tensor, config: TransformerConfig, ps: ParallelState,
                 sequence_parallel: bool) -> Tensor:
    """[s, b, h] (SP: [s/tp, b, h]) -> [s, b, Vp/tp] logits of this rank's vocabulary slice
    (``weight`` [Vp/tp, h]), the padding columns masked (module doc)."""
    # all-gathers the sequence under SP (backward: reduce-scatter), else identity forward
    # and all-reduce backward.
    logits = parallel_lm_logits(x, weight, ps, sequence_parallel=sequence_parallel)
    local = weight.shape[0]
    valid = config.vocab_size - ps.tp_rank * local   # real rows in this slice
    if valid < local:
        mask = torch.arange(local, device=logits.device) >= valid
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    return logits


def logits_or_loss(logits: Tensor, labels: Tensor | None, ps: ParallelState) -> Tensor:
    """Sequence-first logits [s, b, Vp/tp] -> the logits [b, s, Vp/tp] when ``labels`` is None,
    else the per-token cross-entropy [b, s] against ``labels`` [b, s] (fp32, identical on all
    tp ranks; computed without gathering the logits)."""
    if labels is None:
        return logits.transpose(0, 1).contiguous()
    if labels.shape != logits.shape[1::-1]:
        raise MegaliteError(f"labels shape {tuple(labels.shape)} does not match the tokens "
                            f"[batch, seq] = {list(logits.shape[1::-1])}")
    loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), ps)      # [s, b]
    return loss.transpose(0, 1).contiguous()
