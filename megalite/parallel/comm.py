"""Autograd-aware collectives over the tensor-parallel group.

Each function is a pair (forward collective, backward collective) that are adjoint to each
other, so gradients flow correctly through the tensor-parallel regions:

====================================  =============================  ==========================
function                              forward                        backward
====================================  =============================  ==========================
copy_to_tp_region                     identity                       all-reduce (sum)
reduce_from_tp_region                 all-reduce (sum)               identity
scatter_to_tp_region(dim)             keep own chunk of ``dim``      all-gather ``dim``
gather_from_tp_region(dim)            all-gather ``dim``             keep own chunk of ``dim``
scatter_to_sequence_parallel_region   keep own chunk of dim 0        all-gather dim 0
gather_from_sequence_parallel_region  all-gather dim 0               reduce-scatter dim 0
reduce_scatter_to_sequence_...        reduce-scatter dim 0           all-gather dim 0
====================================  =============================  ==========================

Activations inside the transformer are sequence-first ``[s, b, h]``; with sequence parallelism
rank ``r`` of the TP group holds sequence positions ``[r*s/tp, (r+1)*s/tp)``.

Every function is the identity (no ``torch.distributed`` call at all) when ``ps.tp_size == 1``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError

__all__ = [
    "copy_to_tp_region", "reduce_from_tp_region", "scatter_to_tp_region", "gather_from_tp_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "all_reduce", "all_gather", "reduce_scatter",
    "split",
]

# torch renamed the single-tensor collectives; keep working on the older names too.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# -- plain (non-autograd) primitives ------------------------------------------------------------
# They return new tensors without autograd history (the autograd functions below wrap them).
@torch.no_grad()
def all_reduce(x: Tensor, ps: ParallelState) -> Tensor:
    """Sum ``x`` over the TP group (returns a new tensor; ``x`` is untouched)."""
    out = x.clone(memory_format=torch.contiguous_format)  # one copy, even if x is strided
    dist.all_reduce(out, group=ps.tp_group)
    return out


@torch.no_grad()
def split(x: Tensor, dim: int, ps: ParallelState) -> Tensor:
    """This rank's chunk of ``x`` along ``dim``: always a contiguous copy, never a view, so that
    an in-place op on the result cannot reach the other ranks' part of ``x``."""
    size = x.shape[dim]
    if size % ps.tp_size:
        raise MegaliteError(f"cannot split dimension {dim} of size {size} into "
                            f"{ps.tp_size} tensor-parallel shards")
    return x.chunk(ps.tp_size, dim=dim)[ps.tp_rank].clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def all_gather(x: Tensor, dim: int, ps: ParallelState) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (in tp_rank order)."""
    dim = dim % x.dim()
    x = x.contiguous()
    if dim == 0:
        out = x.new_empty((x.shape[0] * ps.tp_size, *x.shape[1:]))
        _all_gather_single(out, x, group=ps.tp_group)
        return out
    parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
    dist.all_gather(parts, x, group=ps.tp_group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def reduce_scatter(x: Tensor, ps: ParallelState) -> Tensor:
    """Sum ``x`` over the TP group and keep this rank's chunk of dim 0."""
    if x.shape[0] % ps.tp_size:
        raise MegaliteError(f"sequence length {x.shape[0]} is not divisible by the "
                            f"tensor-parallel size {ps.tp_size} (needed by sequence parallelism)")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // ps.tp_size, *x.shape[1:]))
    try:
        _reduce_scatter_single(out, x, group=ps.tp_group)
    except RuntimeError as e:
        # Older gloo builds have no reduce-scatter: all-reduce then keep our chunk (same sums,
        # more traffic). The check fails before any data moves, so falling back is safe.
        if "gloo" not in str(e).lower() and "not supported" not in str(e).lower():
            raise
        out = split(all_reduce(x, ps), 0, ps)
    return out


# -- autograd functions -------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.ps), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        return all_reduce(x, ps)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps, dim):
        ctx.ps, ctx.dim = ps, dim
        return split(x, dim, ps)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.ps), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps, dim):
        ctx.ps, ctx.dim = ps, dim
        return all_gather(x, dim, ps)

    @staticmethod
    def backward(ctx, g):
        return split(g, ctx.dim, ctx.ps), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return all_gather(x, 0, ps)

    @staticmethod
    def backward(ctx, g):
        # The gathered activations fed a computation whose other inputs are split over TP
        # (e.g. column-parallel weights), so each rank's gradient is a partial sum.
        return reduce_scatter(g, ctx.ps), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return reduce_scatter(x, ps)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, 0, ctx.ps), None


# Under ``--compile`` (megalite/training/compile.py) the collectives run eagerly: torch.compile
# stops its graph at them (a graph break) instead of tracing process-group calls; recursive, so
# nothing they call is compiled either. Outside compiled code this is a plain call.
@torch.compiler.disable
def _apply(fn: type[torch.autograd.Function], *args) -> Tensor:
    return fn.apply(*args)


# -- public API ---------------------------------------------------------------------------------
def copy_to_tp_region(x: Tensor, ps: ParallelState) -> Tensor:
    """Enter a TP region with a replicated input: forward identity, backward all-reduce."""
    return x if ps.tp_size == 1 else _apply(_CopyToTP, x, ps)


def reduce_from_tp_region(x: Tensor, ps: ParallelState) -> Tensor:
    """Leave a TP region by summing partial results: forward all-reduce, backward identity."""
    return x if ps.tp_size == 1 else _apply(_ReduceFromTP, x, ps)


def scatter_to_tp_region(x: Tensor, ps: ParallelState, dim: int = -1) -> Tensor:
    """Keep this rank's chunk of ``dim`` (forward); all-gather the gradient (backward)."""
    return x if ps.tp_size == 1 else _apply(_ScatterToTP, x, ps, dim)


def gather_from_tp_region(x: Tensor, ps: ParallelState, dim: int = -1) -> Tensor:
    """All-gather ``dim`` (forward); keep this rank's chunk of the gradient (backward)."""
    return x if ps.tp_size == 1 else _apply(_GatherFromTP, x, ps, dim)


def scatter_to_sequence_parallel_region(x: Tensor, ps: ParallelState) -> Tensor:
    """``[s, b, h] -> [s/tp, b, h]`` (this rank's positions); backward all-gathers dim 0."""
    return x if ps.tp_size == 1 else _apply(_ScatterToTP, x, ps, 0)


def gather_from_sequence_parallel_region(x: Tensor, ps: ParallelState) -> Tensor:
    """``[s/tp, b, h] -> [s, b, h]``; backward reduce-scatters the (partial) gradient."""
    return x if ps.tp_size == 1 else _apply(_GatherFromSP, x, ps)


def reduce_scatter_to_sequence_parallel_region(x: Tensor, ps: ParallelState) -> Tensor:
    """Partial sums ``[s, b, h]`` -> summed ``[s/tp, b, h]``; backward all-gathers dim 0."""
    return x if ps.tp_size == 1 else _apply(_ReduceScatterToSP, x, ps)
