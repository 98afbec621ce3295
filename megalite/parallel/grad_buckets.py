"""Data-parallel gradient buckets: reduced after the backward pass, or overlapped with it.

With data parallelism, :class:`GradBuckets` owns this rank's fp32 gradients as one flat buffer
``[sum of numels]`` laid out in *bucket order*: model chunks last to first, and inside a chunk
the parameters in reverse registration order (output layer, final norm, last layer ... first
layer, embedding), which is the order in which backward produces their gradients. The buffer is
cut into buckets of at most ``bucket_bytes``; each bucket is one contiguous slice, all-reduced in
place (:class:`~megalite.parallel.grad_sync.FlatAllReduce`, then divided by dp).

Two kinds of bucket:

* *early* buckets hold parameters whose gradient is final once backward reaches them;
* *deferred* buckets hold the parameters whose gradient is first summed over another group
  (:mod:`megalite.parallel.grad_sync`): with sequence parallelism the ``sequence_parallel``
  ones (sum over tp), with pp > 1 and tied embeddings the pipeline ends' word-embedding copies
  (sum over the first and last stage). Their dp reduction must come after that sum to keep
  today's order of additions, so they are reduced in :meth:`finish` and never overlapped
  (with context parallelism that is every parameter: all gradients are averaged over the
  context-parallel group first, so nothing overlaps);
* *expert* buckets (expert parallelism: the parameters marked ``is_expert``) are summed over
  ``ps.expert_dp_group`` instead and divided by the full dp size
  (:func:`~megalite.parallel.grad_sync.allreduce_expert_gradients`'s rule), in :meth:`finish`.

``--overlap-grad-reduce``: each parameter gets a post-accumulate-grad hook. The schedule calls
:meth:`arm` for a chunk just before that chunk's last microbatch's backward (so a stage's
buckets start only after its last microbatch, never on a partial accumulation); from then on the
hook counts the bucket's parameters, and a bucket whose last gradient has arrived is started
(asynchronous all-reduce) while backward goes on. Buckets always start in bucket order (a ready
bucket waits for the ones before it), so every data-parallel rank issues the same collectives in
the same order whatever the timing. :meth:`finish` (before the optimizer step) starts what is
left, early buckets first and then the deferred and expert ones, and waits for all of them.

Without overlap the same buckets are started in :meth:`finish`, in the same order: both paths
add the same numbers in the same order, so the gradients are bit-identical (tested).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState
from megalite.parallel.grad_sync import FlatAllReduce, tied_embedding_params

__all__ = ["GradBuckets", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""Bucket size (torch DDP's default, 25 MiB of fp32 gradients = 6.5 M elements)."""


class _Bucket:
    """One contiguous slice of the buffer: ``[start, end)``, holding ``params`` (indices)."""

    def __init__(self, start: int, end: int, params: list[int], chunk: int, kind: str):
        self.start, self.end, self.params = start, end, params
        self.chunk, self.kind = chunk, kind              # "early", "deferred" or "expert"
        self.waiting = len(params)          # gradients not yet final in this step
        self.reduction: FlatAllReduce | None = None


class _Divide:
    """The reduction of expert gradients no other rank holds: only the division by dp."""

    def __init__(self, flat: Tensor, divisor: int):
        self.flat, self.divisor = flat, divisor

    def finish(self) -> None:
        self.flat.div_(self.divisor)


def _chunk_order(model_chunks, params: list[nn.Parameter]) -> list[tuple[int, list[int]]]:
    """``(chunk, indices into params)`` for each chunk, last chunk first, each chunk's
    parameters in reverse registration order (backward's order)."""
    index = {id(p): i for i, p in enumerate(params)}
    seen: set[int] = set()
    out = []
    for c, chunk in enumerate(model_chunks):
        mine = []
        for p in chunk.parameters():
            i = index.get(id(p))
            if i is not None and i not in seen:
                seen.add(i)
                mine.append(i)
        out.append((c, mine[::-1]))
    if len(seen) != len(params):
        raise ValueError("GradBuckets: a parameter to reduce belongs to no model chunk")
    return out[::-1]


class GradBuckets:
    """This rank's gradient buffer and its data-parallel buckets (module docstring).

    Args:
        model_chunks: this rank's chunks (one per virtual pipeline stage).
        params: the parameters whose gradients are reduced (the optimizer's order);
            ``views()[i]`` is the gradient of ``params[i]``.
        ps: the layout; buckets are all-reduced over ``ps.dp_group`` (dp_size > 1).
        overlap: start buckets from backward hooks (``--overlap-grad-reduce``).
        bucket_bytes: bucket size limit in bytes of fp32 (a larger tensor gets its own bucket).
    """

    def __init__(self, model_chunks, params: list[nn.Parameter], ps: ParallelState, *,
                 overlap: bool, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.ps, self.overlap = ps, overlap
        special = {id(p) for p in tied_embedding_params(model_chunks)} if ps.pp_size > 1 \
            else set()
        if ps.tp_size > 1:
            special |= {id(p) for p in params if getattr(p, "sequence_parallel", False)}
        if getattr(ps, "cp_size", 1) > 1:   # every gradient is averaged over cp first
            special = {id(p) for p in params}
        experts = {id(p) for p in params if getattr(p, "is_expert", False)} \
            if getattr(ps, "ep_size", 1) > 1 else set()

        def kind_of(p) -> str:
            return "expert" if id(p) in experts else "deferred" if id(p) in special else "early"

        limit = max(1, bucket_bytes // 4)   # elements of fp32
        plan: dict[str, list[tuple[list[int], int]]] = {"early": [], "deferred": [],
                                                        "expert": []}
        for chunk, indices in _chunk_order(model_chunks, params):
            for kind, runs in plan.items():
                size = limit   # start a new bucket for each chunk and kind
                for i in indices:
                    if kind_of(params[i]) != kind:
                        continue
                    n = params[i].numel()
                    if size + n > limit:
                        runs.append(([], chunk))
                        size = 0
                    runs[-1][0].append(i)
                    size += n
        total = sum(p.numel() for p in params)
        self.buffer = torch.zeros(total, dtype=torch.float32, device=params[0].device)
        """The fp32 gradients ``[sum of numels]``, in bucket order."""
        self._views: list[Tensor | None] = [None] * len(params)
        self.buckets: list[_Bucket] = []
        self._bucket_of: list[_Bucket | None] = [None] * len(params)
        offset = 0
        for members, chunk, kind in [(m, c, k) for k, runs in plan.items() for m, c in runs]:
            start = offset
            for i in members:
                n = params[i].numel()
                self._views[i] = self.buffer[offset:offset + n].view_as(params[i])
                offset += n
            bucket = _Bucket(start, offset, members, chunk, kind)
            self.buckets.append(bucket)
            if kind == "early":
                for i in members:
                    self._bucket_of[i] = bucket
        self.num_early = len(plan["early"])
        self._armed: set[int] = set()
        self._next = 0                       # the next bucket to start
        self.started_in_backward = 0
        """Buckets started from backward hooks in this step (0 without overlap)."""
        self._params = params
        self._hooks: list = []

    def install_hooks(self) -> None:
        """With overlap: register the post-accumulate-grad hooks. Call after any hook that
        must see a gradient first (half precision's fold into the fp32 ``main_grad``): hooks
        run in registration order."""
        if self.overlap and not self._hooks:
            self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i))
                           for i, p in enumerate(self._params)]

    def views(self) -> list[Tensor]:
        """The gradient tensor of each parameter (views into :attr:`buffer`, shapes of the
        parameters), in the ``params`` order given to the constructor."""
        return list(self._views)

    def _hook(self, i: int):
        def hook(_param: Tensor) -> None:
            bucket = self._bucket_of[i]
            if bucket is None or bucket.chunk not in self._armed or bucket.waiting == 0:
                return
            bucket.waiting -= 1
            if bucket.waiting == 0:
                self._start_ready()
        return hook

    def _start(self, bucket: _Bucket) -> None:
        flat = self.buffer[bucket.start:bucket.end]
        if bucket.kind == "expert" and self.ps.expert_dp_size == 1:
            bucket.reduction = _Divide(flat, self.ps.dp_size)   # no other rank holds them
            return
        group = self.ps.expert_dp_group if bucket.kind == "expert" else self.ps.dp_group
        bucket.reduction = FlatAllReduce([flat], group, self.ps.dp_size).start()

    def _start_ready(self) -> None:
        # in bucket order only: a ready bucket waits for the ones before it
        while self._next < self.num_early and self.buckets[self._next].waiting == 0:
            self._start(self.buckets[self._next])
            self._next += 1
            self.started_in_backward += 1

    def arm(self, chunk: int) -> None:
        """Called just before ``chunk``'s last backward of the step: from now on its
        buckets start as soon as their gradients are final (no-op without overlap)."""
        if self.overlap:
            self._armed.add(chunk)

    @torch.no_grad()
    def finish(self) -> None:
        """Start every bucket not started yet (early ones, then the deferred and expert ones:
        call after the sequence-parallel and tied-embedding sums), wait for all and average
        over dp."""
        for bucket in self.buckets[self._next:]:
            self._start(bucket)
        self._next = len(self.buckets)
        for bucket in self.buckets:
            bucket.reduction.finish()

    def reset(self) -> None:
        """Forget this step's progress (the optimizer zeroes :attr:`buffer` itself)."""
        self._armed.clear()
        self._next = 0
        self.started_in_backward = 0
        for bucket in self.buckets:
            bucket.waiting = len(bucket.params)
            bucket.reduction = None
