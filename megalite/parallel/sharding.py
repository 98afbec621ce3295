"""Per-parameter sharding metadata, full <-> shard mapping, and layout-independent init.

Every tensor-parallel parameter carries three attributes (set by :func:`set_sharding`) that
tell init, gradient checks, checkpoint resharding and HF conversion how it relates to the full
tensor:

* ``tensor_parallel_dim``: the dimension split over TP, or ``None`` when replicated.
* ``partition_stride``: ``k > 1`` for fused weights made of ``k`` stacked blocks (e.g. ``[gate;
  up]``): each block is split separately, so rank ``r`` holds block0[r] ++ block1[r] ++ ...
* ``sequence_parallel``: replicated parameter that sees only this rank's sequence shard when
  sequence parallelism is on (norm weights, row-parallel bias): its gradient is a partial sum
  and must be summed over TP before the optimizer step. The query/key norms of
  ``qk_layernorm`` carry it whenever TP > 1 (each rank normalizes its own heads).

A parameter of full shape ``[n, ...]`` split on dim 0 over ``tp`` ranks has shape
``[n/tp, ...]`` on every rank; a replicated one has the full shape everywhere.

Layout-independent init (:func:`init_parameter_`): each full tensor is drawn on CPU from a
generator seeded by ``(seed, name)`` and each rank keeps its shard, so TP=1, 2, 4, 8 hold the
same full weights, bit for bit. Peak extra memory is one full tensor (in fp32) at a time.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError

__all__ = ["InitFn", "set_sharding", "sharding_of", "shard_tensor", "unshard_tensors",
           "full_shape", "gather_full_tensor", "seed_for", "init_shard_", "init_parameter_"]

InitFn = Callable[[Tensor, torch.Generator], None]
"""``init_fn(master, generator)`` fills the full-shape CPU tensor ``master`` in place, drawing
only from ``generator`` (e.g. ``lambda t, g: t.normal_(0, 0.02, generator=g)``)."""


def set_sharding(param: Tensor, tensor_parallel_dim: int | None = None, partition_stride: int = 1,
                 sequence_parallel: bool = False) -> Tensor:
    """Attach the sharding attributes (see module docstring) to ``param``; returns it."""
    param.tensor_parallel_dim = tensor_parallel_dim
    param.partition_stride = partition_stride
    param.sequence_parallel = sequence_parallel
    return param


def sharding_of(param: Tensor) -> tuple[int | None, int]:
    """``(tensor_parallel_dim, partition_stride)`` of ``param`` (replicated, 1 when unset)."""
    return getattr(param, "tensor_parallel_dim", None), getattr(param, "partition_stride", 1)


def _check_divisible(size: int, dim: int, stride: int, tp_size: int) -> None:
    if size % (stride * tp_size):
        raise MegaliteError(f"dimension {dim} of size {size} cannot be split into "
                            f"{stride} block(s) x {tp_size} tensor-parallel shards")


def shard_tensor(full: Tensor, dim: int | None, stride: int, tp_rank: int, tp_size: int) -> Tensor:
    """Rank ``tp_rank``'s shard of the ``full`` tensor (a contiguous copy; ``full`` if replicated).

    With ``stride`` k the dimension is k equal blocks, each split into ``tp_size`` chunks; the shard
    is the concatenation of chunk ``tp_rank`` of every block.
    """
    if dim is None or tp_size == 1:
        return full
    _check_divisible(full.shape[dim], dim, stride, tp_size)
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim).contiguous()


def unshard_tensors(shards: list[Tensor], dim: int | None, stride: int) -> Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from all ranks' shards (in tp_rank order).

    For a replicated parameter (``dim is None``) the first shard is returned.
    """
    if dim is None or len(shards) == 1:
        return shards[0]
    _check_divisible(shards[0].shape[dim], dim, stride, 1)
    pieces = [s.chunk(stride, dim=dim) for s in shards]  # pieces[rank][block]
    return torch.cat([pieces[r][b] for b in range(stride) for r in range(len(shards))], dim=dim)


def full_shape(param: Tensor, tp_size: int) -> torch.Size:
    """Shape of the unsharded tensor of which ``param`` is one TP shard."""
    dim, _ = sharding_of(param)
    shape = list(param.shape)
    if dim is not None:
        shape[dim] *= tp_size
    return torch.Size(shape)


def gather_full_tensor(param_or_grad: Tensor, meta_from: Tensor, ps: ParallelState) -> Tensor:
    """The full tensor assembled from every TP rank's shard of ``param_or_grad``.

    ``meta_from`` is the parameter whose sharding attributes apply (pass the parameter itself, or
    the parameter when gathering its ``.grad``). Collective over the TP group: all TP ranks must
    call it for the same parameter. Replicated tensors are returned as a detached copy.
    """
    dim, stride = sharding_of(meta_from)
    t = param_or_grad.detach()
    if dim is None or ps.tp_size == 1:
        return t.clone()
    t = t.contiguous()
    shards = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(shards, t, group=ps.tp_group)
    return unshard_tensors(shards, dim, stride)


def seed_for(seed: int, name: str) -> int:
    """A 63-bit generator seed derived from ``(seed, name)`` (stable across runs and machines,
    unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_shard_(param: Tensor, init_fn: InitFn, generator: torch.Generator,
                ps: ParallelState) -> None:
    """Fill ``param`` (a TP shard) with its shard of a full tensor drawn by ``init_fn`` from
    ``generator``. Nothing is drawn for parameters on the meta device."""
    if param.device.type == "meta":
        return
    # Draw the FULL tensor on CPU, in fp32 (fp64 stays fp64), so every layout and dtype sees the
    # same numbers; then keep this rank's shard.
    master_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    master = torch.empty(full_shape(param, ps.tp_size), dtype=master_dtype, device="cpu")
    init_fn(master, generator)
    dim, stride = sharding_of(param)
    with torch.no_grad():
        param.copy_(shard_tensor(master, dim, stride, ps.tp_rank, ps.tp_size))


def init_parameter_(param: Tensor, init_fn: InitFn, seed: int, name: str,
                    ps: ParallelState) -> None:
    """Initialize ``param`` (a TP shard) so that the full tensor depends only on ``(seed, name)``.

    ``init_fn`` (see :data:`InitFn`) draws the full tensor from a generator seeded
    :func:`seed_for` ``(seed, name)``; this rank's shard of it is copied into ``param``.
    TP=1,2,4,8 therefore produce identical full weights. Does nothing for parameters on the
    meta device.
    """
    if param.device.type == "meta":
        return
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed_for(seed, name))
    init_shard_(param, init_fn, generator, ps)
