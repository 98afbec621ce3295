"""Tensor-parallel layers.

Layers (activations sequence-first ``[s, b, h]``; with sequence parallelism (SP) the sequence
dimension is split over the TP group, ``[s/tp, b, h]``):

* :class:`ColumnParallelLinear` ``Y = X A^T + b`` with ``A``'s output rows split: rank ``r`` holds
  ``A[r*o/tp:(r+1)*o/tp, :]`` and produces ``Y[..., r*o/tp:(r+1)*o/tp]``.
* :class:`RowParallelLinear` with ``A``'s input columns split: each rank multiplies its input
  shard by its columns and the partial products are summed (all-reduce, or reduce-scatter over
  the sequence with SP); the replicated bias is added after the sum.
* :class:`VocabParallelEmbedding` with the vocabulary rows split; each rank looks up the ids in its
  range, zeros the rest, and the partial embeddings are summed.

Each layer takes a :class:`~megalite.parallel.context.ModelContext` (layout, device, dtype) and
tags its parameters with the sharding attributes of :mod:`megalite.parallel.sharding`. Built
off the meta device, a layer initializes its weight from torch's default generator (full
master weight drawn, this rank's shard kept: layout independent, since that generator is seeded
alike on all TP ranks) and zeros its bias; on the meta device it draws nothing. A model builds
its layers on the meta device and initializes each parameter once, by name
(:mod:`megalite.model.weights`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.parallel import comm
from megalite.parallel.context import ModelContext
from megalite.parallel.sharding import InitFn, init_shard_, set_sharding

__all__ = [
    "default_weight_init",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
]




def default_weight_init(master: Tensor, generator: torch.Generator) -> None:
    """Normal(0, 0.02): GPT-2's initializer, the layers' default."""
    master.normal_(0.0, 0.02, generator=generator)


def _make_param(shape, ctx: ModelContext) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=ctx.device, dtype=ctx.dtype))


def _init_layer(weight: Tensor, bias: Tensor | None, init_method: InitFn | None,
                ps: ParallelState) -> None:
    # Default init draws the full master weight from torch's default generator, which is seeded
    # identically on all TP ranks (see megalite.parallel.random.model_parallel_seed), so it is
    # layout independent too. Models build on the meta device (nothing drawn here) and
    # initialize once with init_parameter_ and named seeds.
    init_shard_(weight, init_method or default_weight_init, torch.default_generator, ps)
    if bias is not None and bias.device.type != "meta":
        with torch.no_grad():
            bias.zero_()


def _tp_chunk(size: int, what: str, ps: ParallelState, stride: int = 1) -> int:
    if size % (ps.tp_size * stride):
        raise MegaliteError(f"{what} {size} is not divisible by tensor-parallel size "
                            f"{ps.tp_size}" + (f" x partition stride {stride}" if stride > 1 else ""))
    return size // ps.tp_size


# -- layers -------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with the output features split over TP.

    weight ``[output_size/tp, input_size]``, bias ``[output_size/tp]`` (both split on dim 0).
    forward: ``x [s, b, in]`` (``[s/tp, b, in]`` with SP, gathered here) -> ``[s, b, out/tp]``,
    or ``[s, b, out]`` with ``gather_output``.
    """

    def __init__(self, input_size: int, output_size: int, ctx: ModelContext, *, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 partition_stride: int = 1, init_method: InitFn | None = None):
        super().__init__()
        ps = self.ps = ctx.ps
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        local = _tp_chunk(output_size, "output size", ps, partition_stride)
        self.weight = set_sharding(_make_param((local, input_size), ctx), 0, partition_stride)
        self.bias = (set_sharding(_make_param((local,), ctx), 0, partition_stride)
                     if bias else None)
        _init_layer(self.weight, self.bias, init_method, ps)

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            x = comm.gather_from_sequence_parallel_region(x, self.ps)
        else:
            x = comm.copy_to_tp_region(x, self.ps)
        y = F.linear(x, self.weight, self.bias)
        return comm.gather_from_tp_region(y, self.ps, dim=-1) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (local {self.weight.shape[0]}), "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with the input features split over TP.

    weight ``[output_size, input_size/tp]`` (split on dim 1); bias ``[output_size]`` replicated,
    added after the reduction. forward: ``x [s, b, in/tp]`` (or ``[s, b, in]`` when
    ``input_is_parallel=False``, split here) -> ``[s, b, out]`` (all-reduce) or ``[s/tp, b, out]``
    with SP (reduce-scatter over the sequence).
    """

    def __init__(self, input_size: int, output_size: int, ctx: ModelContext, *, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 init_method: InitFn | None = None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise MegaliteError("RowParallelLinear with sequence_parallel needs input_is_parallel")
        ps = self.ps = ctx.ps
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        local = _tp_chunk(input_size, "input size", ps)
        self.weight = set_sharding(_make_param((output_size, local), ctx), 1)
        # With SP the bias is added to this rank's sequence shard only: its grad is partial.
        self.bias = (set_sharding(_make_param((output_size,), ctx), None, 1, sequence_parallel)
                     if bias else None)
        _init_layer(self.weight, self.bias, init_method, ps)

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = comm.scatter_to_tp_region(x, self.ps, dim=-1)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence_parallel_region(y, self.ps)
        else:
            y = comm.reduce_from_tp_region(y, self.ps)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (local {self.weight.shape[1]}), out={self.output_size}, "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


def _check_ids_in_range(ids: Tensor, num_embeddings: int) -> None:
    """Refuse ids outside ``[0, num_embeddings)``: under TP such an id is outside every rank's
    slice and would silently embed to zeros. On CPU a clear MegaliteError; on an accelerator an
    asynchronous device assert (no host sync on the hot path; it still stops the run)."""
    if ids.device.type == "meta" or ids.numel() == 0:
        return
    if ids.device.type == "cpu":
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_embeddings:
            raise MegaliteError(f"token id {lo if lo < 0 else hi} is outside the embedding's "
                                f"{num_embeddings} rows (ids must be in [0, {num_embeddings}))")
    else:
        torch._assert_async(((ids >= 0) & (ids < num_embeddings)).all())


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over TP.

    weight ``[num_embeddings/tp, embedding_dim]``: rank ``r`` holds ids
    ``[r*V/tp, (r+1)*V/tp)``. forward: ``ids [b, s]`` (global ids) -> ``[b, s, h]``, summed over
    TP (all-reduce). With ``reduce_output=False`` the partial sums are returned so the caller can
    reduce-scatter them itself (sequence parallelism: transpose to ``[s, b, h]`` then
    :func:`comm.reduce_scatter_to_sequence_parallel_region`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: ModelContext, *,
                 reduce_output: bool = True, init_method: InitFn | None = None):
        super().__init__()
        ps = self.ps = ctx.ps
        self.reduce_output = reduce_output
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _tp_chunk(num_embeddings, "vocabulary size", ps)
        self.vocab_start, self.vocab_end = ps.tp_rank * local, (ps.tp_rank + 1) * local
        self.weight = set_sharding(_make_param((local, embedding_dim), ctx), 0)
        _init_layer(self.weight, None, init_method, ps)

    def forward(self, ids: Tensor) -> Tensor:
        _check_ids_in_range(ids, self.num_embeddings)
        if self.ps.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return comm.reduce_from_tp_region(out, self.ps) if self.reduce_output else out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (local [{self.vocab_start}, {self.vocab_end})), "
                f"{self.embedding_dim}")


def parallel_lm_logits(hidden: Tensor, weight: Tensor, ps: ParallelState, *,
                       sequence_parallel: bool = False, bias: Tensor | None = None) -> Tensor:
    """Output-layer logits for this rank's vocabulary slice (e.g. with a tied embedding weight).

    ``hidden [s, b, h]`` (``[s/tp, b, h]`` with SP), ``weight [V/tp, h]`` -> ``[s, b, V/tp]``;
    feed it to :func:`megalite.parallel.cross_entropy.vocab_parallel_cross_entropy`.
    """
    if sequence_parallel:
        hidden = comm.gather_from_sequence_parallel_region(hidden, ps)
    else:
        hidden = comm.copy_to_tp_region(hidden, ps)
    return F.linear(hidden, weight, bias)
