"""Gradient reductions across model replicas and across the two copies of a tied embedding.

* :func:`allreduce_gradients`: plain data parallelism. Each data-parallel rank computed the
  gradient of its share of the global batch; averaging over ``ps.dp_group`` gives every
  replica the gradient of the whole batch. Gradients are packed into flat buckets of at most
  ``bucket_bytes`` (one all-reduce per bucket instead of one per parameter: per-call latency
  dominates for the many small tensors of a transformer), the buckets' all-reduces are all in
  flight at once, then the results are copied back. Gradients that already lie back to back
  in one buffer (the optimizer's flat fp32 ``main_grad``) are reduced in place, without the
  two copies.
* :func:`allreduce_embedding_grads`: with pp > 1 and tied embeddings the first stage's word
  embedding and the last stage's ``output_layer`` copy (marked ``shared_embedding``) are one
  parameter used twice; each stage only sees its own use's gradient, so the two are summed
  over ``ps.embedding_group``. Both copies then take the same optimizer step and stay equal.

Neither function touches a rank outside its group; both are no-ops when their group has one
member.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState

__all__ = ["allreduce_gradients", "allreduce_embedding_grads", "tied_embedding_params"]


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
    pending = []
    for bucket in _buckets(grads, bucket_bytes):
        flat = _flat_view(bucket)
        packed = flat is None
        if packed:
            flat = torch.cat([g.reshape(-1) for g in bucket])
        pending.append((bucket, flat, packed,
                        dist.all_reduce(flat, group=ps.dp_group, async_op=True)))
    for bucket, flat, packed, work in pending:
        work.wait()
        if average:
            flat.div_(ps.dp_size)
        if packed:
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _flat_view(bucket: list[Tensor]) -> Tensor | None:
    """One 1-D view covering the whole bucket when its tensors are contiguous and lie back to
    back in one storage (e.g. ``main_grad`` views into the optimizer's flat buffer): then the
    all-reduce works in place, without packing and unpacking copies. None otherwise."""
    first = bucket[0]
    storage = first.untyped_storage()
    expected = first.storage_offset()
    for g in bucket:
        if (not g.is_contiguous() or g.untyped_storage().data_ptr() != storage.data_ptr()
                or g.storage_offset() != expected):
            return None
        expected += g.numel()
    return first.new_empty(0).set_(storage, first.storage_offset(),
                                   (expected - first.storage_offset(),))


def tied_embedding_params(model_chunks) -> list[torch.nn.Parameter]:
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
    dist.all_reduce(grad, group=ps.embedding_group)
