"""Gradient synchronisation: this rank's accumulated gradients -> the full-batch gradient.

After the last microbatch of a step, :func:`sync_model_grads` (what the optimizers call) runs

1. :func:`allreduce_sequence_parallel_grads`: with sequence parallelism, parameters marked
   ``sequence_parallel`` (norm weights, row-parallel biases) saw only this tp rank's slice of
   the sequence; their gradients are summed over ``ps.tp_group``.
2. :func:`allreduce_embedding_grads`: with pp > 1 and tied embeddings the first stage's word
   embedding and the last stage's ``output_layer`` copy (marked ``shared_embedding``) are one
   parameter used twice; each stage only sees its own use's gradient, so the two are summed
   over ``ps.embedding_group``. Both copies then take the same optimizer step and stay equal.
3. :func:`allreduce_gradients`: plain data parallelism. Each data-parallel rank computed the
   gradient of its share of the global batch; averaging over ``ps.dp_group`` gives every
   replica the gradient of the whole batch. Gradients go in flat buckets of at most
   ``bucket_bytes`` (one all-reduce per bucket instead of one per parameter: per-call latency
   dominates for the many small tensors of a transformer), all buckets in flight at once.

   With expert parallelism, expert parameters (marked ``is_expert`` by the MoE layer) differ
   between the ranks of an expert-parallel group, so they are summed over
   ``ps.expert_dp_group`` instead (the ranks holding the same experts) and divided by the full
   dp size, as each expert's gradient already holds the whole EP group's tokens:
   :func:`allreduce_expert_gradients`.

All three are sums (or a mean), so their order does not matter mathematically, and all three
use one flat all-reduce, :class:`FlatAllReduce`: the tensors of a list are reduced as one 1-D
buffer, in place when they already lie back to back in one storage (the optimizer's flat fp32
``main_grad``), else packed into a copy and unpacked after. Its ``start`` (pack, launch) and
``finish`` (wait, average, unpack) are separate so that a per-bucket hook can later start a
data-parallel bucket as soon as its last gradient is accumulated (overlap with backward) while
``finish`` stays where :func:`sync_model_grads` runs.

With context parallelism (:mod:`megalite.parallel.context_parallel`) the gradients are first
averaged over ``ps.cp_group`` (:func:`allreduce_context_parallel_grads`): each CP rank's loss
is the mean over its own part of every sequence.

Each function touches no rank outside its group and is a no-op when its group has one member.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState

__all__ = ["FlatAllReduce", "allreduce_gradients", "allreduce_expert_gradients",
           "split_expert_grads", "allreduce_embedding_grads",
           "allreduce_sequence_parallel_grads", "allreduce_context_parallel_grads",
           "sync_model_grads", "tied_embedding_params"]


def _flat_view(tensors: list[Tensor]) -> Tensor | None:
    """One 1-D view covering all ``tensors`` when they are contiguous, of one dtype and lie
    back to back in one storage (e.g. ``main_grad`` views into the optimizer's flat buffer):
    then the all-reduce works in place, without packing and unpacking copies. None otherwise."""
    first = tensors[0]
    storage = first.untyped_storage()
    expected = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() != expected):
            return None
        expected += t.numel()
    return first.new_empty(0).set_(storage, first.storage_offset(),
                                   (expected - first.storage_offset(),))


class FlatAllReduce:
    """All-reduce (sum) of ``tensors`` over ``group`` as one flat buffer, in place.

    ``divisor``: divide the sum by it (an average); ``start()`` packs and launches the
    collective (asynchronous), ``finish()`` waits, divides and writes the result back into the
    tensors. Every rank of ``group`` must reduce tensors of the same shapes in the same order.
    """

    def __init__(self, tensors: list[Tensor], group, divisor: int | None = None):
        self.tensors, self.group, self.divisor = tensors, group, divisor
        self.flat = _flat_view(tensors)
        self.packed = self.flat is None
        self.work = None

    def start(self) -> "FlatAllReduce":
        if self.packed:
            self.flat = torch.cat([t.reshape(-1) for t in self.tensors])
        self.work = dist.all_reduce(self.flat, group=self.group, async_op=True)
        return self

    def finish(self) -> None:
        self.work.wait()
        if self.divisor is not None:
            self.flat.div_(self.divisor)
        if self.packed:
            offset = 0
            for t in self.tensors:
                t.copy_(self.flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _buckets(grads: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Consecutive runs of same-dtype, same-device tensors of at most ``bucket_bytes`` (a
    tensor larger than that gets a bucket of its own)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        cur = buckets[-1] if buckets else None
        if (cur is None or cur[0].dtype != g.dtype or cur[0].device != g.device
                or size + nbytes > bucket_bytes):
            buckets.append([g])
            size = nbytes
        else:
            cur.append(g)
            size += nbytes
    return buckets


@torch.no_grad()
def allreduce_gradients(grads: list[Tensor], ps: ParallelState, *, average: bool = True,
                        bucket_bytes: int = 25 * 2**20) -> None:
    """Sum (``average``: then divide by dp_size) ``grads`` in place over ``ps.dp_group``.

    ``grads``: this rank's gradient tensors (``p.grad`` or fp32 ``p.main_grad``), in the same
    order and shapes on every data-parallel rank. Collective over the data-parallel group.
    """
    if ps.dp_size == 1 or not grads:
        return
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    divisor = ps.dp_size if average else None
    pending = [FlatAllReduce(bucket, ps.dp_group, divisor).start()
               for bucket in _buckets(grads, bucket_bytes)]
    for reduction in pending:
        reduction.finish()


@torch.no_grad()
def allreduce_expert_gradients(grads: list[Tensor], ps: ParallelState, *,
                               bucket_bytes: int = 25 * 2**20) -> None:
    """Average the expert parameters' ``grads`` in place: sum over ``ps.expert_dp_group`` (the
    ranks holding the same experts), divided by ``ps.dp_size`` (each rank's expert gradient
    already sums the tokens of its whole expert-parallel group, i.e. ep_size dp shares)."""
    if not grads or ps.dp_size == 1:
        return
    if ps.expert_dp_size == 1:
        torch._foreach_div_(grads, ps.dp_size)
        return
    pending = [FlatAllReduce(bucket, ps.expert_dp_group, ps.dp_size).start()
               for bucket in _buckets(grads, bucket_bytes)]
    for reduction in pending:
        reduction.finish()


def split_expert_grads(params: list[Tensor], grads: list[Tensor]
                       ) -> tuple[list[Tensor], list[Tensor]]:
    """(dense gradients, expert gradients): ``grads[i]`` belongs to ``params[i]``; expert
    parameters are those the MoE layer marked ``is_expert``."""
    dense, expert = [], []
    for p, g in zip(params, grads, strict=True):
        (expert if getattr(p, "is_expert", False) else dense).append(g)
    return dense, expert


@torch.no_grad()
def allreduce_sequence_parallel_grads(params: Iterable[Tensor], ps: ParallelState,
                                      grads: list[Tensor] | None = None) -> None:
    """Sum over tp the gradients of the ``params`` marked ``sequence_parallel`` (one flat
    collective over ``ps.tp_group``).

    ``grads[i]`` is the gradient of ``params[i]`` (default: each ``p.grad``; parameters
    without one are left out). With SP each tp rank's norm weights / row-parallel biases saw
    only its own sequence shard, so each gradient is a partial sum; after this every rank
    holds the full one.
    """
    if ps.tp_size == 1:
        return
    params = list(params)
    if grads is None:
        params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in params]
    sp = [g for p, g in zip(params, grads, strict=True) if getattr(p, "sequence_parallel", False)]
    if sp:
        FlatAllReduce(sp, ps.tp_group).start().finish()


def tied_embedding_params(model_chunks) -> list[nn.Parameter]:
    """This rank's copies of a tied word embedding that live on a pipeline end: the first
    chunk's word embedding (first stage) and/or the last chunk's ``shared_embedding`` output
    layer (last stage). Empty for untied models and middle stages."""
    if not model_chunks or not model_chunks[0].config.tied_embeddings:
        return []
    params = []
    first, last = model_chunks[0], model_chunks[-1]
    if first.pre_process:
        params.append(first.embedding.word_embeddings.weight)
    if last.post_process and hasattr(last, "output_layer"):
        w = last.output_layer.weight
        if getattr(w, "shared_embedding", False):
            params.append(w)
    return params


@torch.no_grad()
def allreduce_embedding_grads(model_chunks, ps: ParallelState, grad_attr: str = "grad") -> None:
    """Sum the tied word embedding's gradient over its two copies (first and last stage).

    Runs on the ranks of ``ps.embedding_group`` (the first and last pipeline stage of each
    (tp, dp) coordinate); a no-op on other ranks, with pp == 1 (one copy) or untied embeddings.
    ``grad_attr``: where the gradient lives (``"grad"`` or ``"main_grad"``). A copy with no
    gradient yet gets a zero one, so the collective always matches.
    """
    if ps.pp_size == 1 or ps.embedding_group is None:
        return
    params = tied_embedding_params(model_chunks)
    if not params:
        return
    (p,) = params   # pp > 1: a rank is either the first or the last stage, never both
    grad = getattr(p, grad_attr, None)
    if grad is None:
        grad = torch.zeros_like(p, dtype=torch.float32 if grad_attr == "main_grad" else p.dtype)
        setattr(p, grad_attr, grad)
    FlatAllReduce([grad], ps.embedding_group).start().finish()


@torch.no_grad()
def allreduce_context_parallel_grads(grads: list[Tensor], ps: ParallelState) -> None:
    """Average ``grads`` over ``ps.cp_group`` in place (same order and shapes on every CP
    rank; one flat collective per dtype); a no-op when cp == 1."""
    if ps.cp_size == 1 or not grads:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    pending = [FlatAllReduce(group, ps.cp_group, ps.cp_size).start()
               for group in by_dtype.values()]
    for reduction in pending:
        reduction.finish()


def sync_model_grads(model_chunks, params: list[Tensor], grads: list[Tensor], ps: ParallelState,
                     *, grad_attr: str, data_parallel: bool = True, buckets=None) -> None:
    """Make ``grads`` (``grads[i]`` belongs to ``params[i]``, this rank's parameters of
    ``model_chunks``) the full-batch gradient: the sequence-parallel sum, the tied-embedding
    sum and, with ``data_parallel``, the data-parallel average (module docstring).

    ``grad_attr`` names where the gradients live (``"grad"`` or ``"main_grad"``), for the
    embedding sum which looks them up on the parameters. ZeRO passes ``data_parallel=False``
    (DeepSpeed reduce-scatters over the data-parallel group itself). ``buckets``: the
    optimizer's :class:`~megalite.parallel.grad_buckets.GradBuckets` holding ``grads``, which
    then does the data-parallel average (some buckets may have started during backward).
    """
    allreduce_sequence_parallel_grads(params, ps, grads)
    allreduce_embedding_grads(model_chunks, ps, grad_attr=grad_attr)
    allreduce_context_parallel_grads(grads, ps)
    if data_parallel and buckets is not None:
        buckets.finish()
    elif data_parallel:
        if getattr(ps, "ep_size", 1) > 1:
            grads, expert = split_expert_grads(params, grads)
            allreduce_expert_gradients(expert, ps)
        allreduce_gradients(grads, ps, average=True)
