"""Tensor-parallel layers and the per-parameter sharding metadata.

Layers (activations sequence-first ``[s, b, h]``; with sequence parallelism (SP) the sequence
dimension is split over the TP group, ``[s/tp, b, h]``):

* :class:`ColumnParallelLinear` ``Y = X A^T + b`` with ``A``'s output rows split: rank ``r`` holds
  ``A[r*o/tp:(r+1)*o/tp, :]`` and produces ``Y[..., r*o/tp:(r+1)*o/tp]``.
* :class:`RowParallelLinear` with ``A``'s input columns split: each rank multiplies its input
  shard by its columns and the partial products are summed (all-reduce, or reduce-scatter over
  the sequence with SP); the replicated bias is added after the sum.
* :class:`VocabParallelEmbedding` with the vocabulary rows split; each rank looks up the ids in its
  range, zeros the rest, and the partial embeddings are summed.

Every parameter carries three attributes (set by :func:`set_sharding`) that tell layout-independent
init, gradient checks, checkpoint resharding and HF conversion how it relates to the full tensor:

* ``tensor_parallel_dim``: the dimension split over TP, or ``None`` when replicated.
* ``partition_stride``: ``k > 1`` for fused weights made of ``k`` stacked blocks (e.g. ``[gate;
  up]``): each block is split separately, so rank ``r`` holds block0[r] ++ block1[r] ++ ...
* ``sequence_parallel``: replicated parameter that sees only this rank's sequence shard when SP is
  on (norm weights, row-parallel bias): its gradient must be summed over TP
  (:func:`megalite.parallel.grad_sync.allreduce_sequence_parallel_grads`) before the optimizer
  step.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.parallel import comm

__all__ = [
    "set_sharding", "shard_tensor", "unshard_tensors", "full_shape", "gather_full_tensor",
    "init_parameter_", "seed_for", "default_weight_init",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
]

InitFn = Callable[[Tensor, torch.Generator], None]


# -- sharding metadata and full <-> shard mapping ------------------------------------------------
def set_sharding(param: Tensor, tensor_parallel_dim: int | None = None, partition_stride: int = 1,
                 sequence_parallel: bool = False) -> Tensor:
    """Attach the sharding attributes (see module docstring) to ``param``; returns it."""
    param.tensor_parallel_dim = tensor_parallel_dim
    param.partition_stride = partition_stride
    param.sequence_parallel = sequence_parallel
    return param


def _meta(param: Tensor) -> tuple[int | None, int]:
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
    dim, _ = _meta(param)
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
    dim, stride = _meta(meta_from)
    t = param_or_grad.detach()
    if dim is None or ps.tp_size == 1:
        return t.clone()
    t = t.contiguous()
    shards = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(shards, t, group=ps.tp_group)
    return unshard_tensors(shards, dim, stride)


# -- layout-independent initialization ----------------------------------------------------------
def seed_for(seed: int, name: str) -> int:
    """A 63-bit generator seed derived from ``(seed, name)`` (stable across runs and machines,
    unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_from_generator(param: Tensor, init_fn: InitFn, generator: torch.Generator,
                         ps: ParallelState) -> None:
    if param.device.type == "meta":
        return
    # Draw the FULL tensor on CPU, in fp32 (fp64 stays fp64), so every layout and dtype sees the
    # same numbers; then keep this rank's shard.
    master_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    master = torch.empty(full_shape(param, ps.tp_size), dtype=master_dtype, device="cpu")
    init_fn(master, generator)
    dim, stride = _meta(param)
    with torch.no_grad():
        param.copy_(shard_tensor(master, dim, stride, ps.tp_rank, ps.tp_size))


def init_parameter_(param: Tensor, init_fn: InitFn, seed: int, name: str,
                    ps: ParallelState) -> None:
    """Initialize ``param`` (a TP shard) so that the full tensor depends only on ``(seed, name)``.

    ``init_fn(master, generator)`` fills the full-shape CPU tensor ``master`` in place, drawing
    only from ``generator`` (e.g. ``lambda t, g: t.normal_(0, 0.02, generator=g)``); this rank's
    shard of it is copied into ``param``. TP=1,2,4,8 therefore produce identical full weights.
    Does nothing for parameters on the meta device.
    """
    if param.device.type == "meta":
        return
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed_for(seed, name))
    _init_from_generator(param, init_fn, generator, ps)


def default_weight_init(master: Tensor, generator: torch.Generator) -> None:
    """Normal(0, 0.02): GPT-2's initializer, the layers' default."""
    master.normal_(0.0, 0.02, generator=generator)


def _make_param(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


def _init_layer(weight: Tensor, bias: Tensor | None, init_method: InitFn | None,
                ps: ParallelState) -> None:
    # Default init draws the full master weight from torch's default generator, which is seeded
    # identically on all TP ranks (see megalite.parallel.random.model_parallel_seed), so it is
    # layout independent too. Models re-initialize with init_parameter_ and named seeds.
    _init_from_generator(weight, init_method or default_weight_init, torch.default_generator, ps)
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

    def __init__(self, input_size: int, output_size: int, *, ps: ParallelState, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 partition_stride: int = 1, init_method: InitFn | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.ps, self.gather_output, self.sequence_parallel = ps, gather_output, sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        local = _tp_chunk(output_size, "output size", ps, partition_stride)
        self.weight = set_sharding(_make_param((local, input_size), device, dtype), 0,
                                   partition_stride)
        self.bias = (set_sharding(_make_param((local,), device, dtype), 0, partition_stride)
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

    def __init__(self, input_size: int, output_size: int, *, ps: ParallelState, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 init_method: InitFn | None = None, device=None, dtype=None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise MegaliteError("RowParallelLinear with sequence_parallel needs input_is_parallel")
        self.ps, self.input_is_parallel = ps, input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        local = _tp_chunk(input_size, "input size", ps)
        self.weight = set_sharding(_make_param((output_size, local), device, dtype), 1)
        # With SP the bias is added to this rank's sequence shard only: its grad is partial.
        self.bias = (set_sharding(_make_param((output_size,), device, dtype), None, 1,
                                  sequence_parallel) if bias else None)
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

    def __init__(self, num_embeddings: int, embedding_dim: int, *, ps: ParallelState,
                 reduce_output: bool = True, init_method: InitFn | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.ps, self.reduce_output = ps, reduce_output
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _tp_chunk(num_embeddings, "vocabulary size", ps)
        self.vocab_start, self.vocab_end = ps.tp_rank * local, (ps.tp_rank + 1) * local
        self.weight = set_sharding(_make_param((local, embedding_dim), device, dtype), 0)
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
