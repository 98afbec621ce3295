"""Point-to-point transfer of activations and gradients between adjacent pipeline stages.

Messages run along the edges of the chain of *virtual stages* ``v = chunk * pp + pp_rank``
(``v`` and ``v + 1`` are on adjacent ranks; the last rank's chunk ``c`` feeds rank 0's chunk
``c + 1``, so the physical ranks form a ring when interleaving):

* activation of microbatch ``m``: virtual stage ``v`` -> ``v + 1`` (rank ``r`` -> ``r + 1 mod pp``)
* gradient of that activation:    virtual stage ``v + 1`` -> ``v`` (rank ``r + 1 mod pp`` -> ``r``)

Every tensor has the fixed shape ``[s / (tp if sequence parallel else 1), micro_batch, hidden]``
and the activation dtype, so no shape is ever exchanged.

The schedule talks through :meth:`P2P.exchange`: before each of its exchange steps (a lone
forward or backward, or a steady-state forward + backward pair) it posts what the previous step
produced together with what this step needs, as one ``batch_isend_irecv`` group. Receives are
waited for when their tensor is needed; sends stay in flight (their buffers kept alive) until
:meth:`P2P.wait_sends` at the end of the schedule. On gloo (:attr:`P2P.early_receives`) the
receives of each exchange step are posted one step earlier, on their own, so that a message
can arrive while the rank still computes the step before; tags make that order safe (below).
NCCL keeps the grouped order, which its stream model needs.

Why this cannot deadlock, on either backend:

* gloo: sends progress on their own, so a rank only ever waits for a message its peer posts
  without waiting on anything this rank has not done yet; any schedule order that respects
  the data dependencies completes. Each message carries a tag unique to its (edge,
  microbatch, kind), so a receive can only match the message meant for it, even when
  activations and gradients travel between the same two ranks in the same direction (pp = 2
  interleaved).
* NCCL ignores tags and runs the operations with one peer in posting order on one stream, a
  send blocking until the peer receives. Our schedules post the messages of every rank pair in
  the same order on both ends, and grouping the sends with the following receives (the
  steady state's forward and backward in one group) lets two neighbours that both send
  before they receive proceed. Both properties are checked for many
  (pp, vp, microbatches) by replaying the schedules under this stream model in
  tests/unit/test_pipeline_stages.py. (No NCCL machine was available to run it for real.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState

__all__ = ["P2P", "Incoming"]

_ACTIVATION, _GRADIENT = 0, 1


class Incoming:
    """A posted receive: ``get()`` waits for it (once) and returns the tensor."""

    def __init__(self, buf: Tensor, work):
        self._buf, self._work = buf, work

    def get(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._buf


# NCCL process groups whose communicator exists (every pipeline rank reaches the first schedule
# run together, so adding a group here happens on all of them alike).
_NCCL_READY: set = set()


class P2P:
    """Sends/receives of one schedule run on this rank (holds the in-flight sends).

    Args:
        ps: this rank's layout; peers are taken from ``ps.pp_group_ranks``.
        shape: the activation shape ``[s_local, b, h]``.
        dtype, device: of the activations (and their gradients).
        num_chunks: chunks (virtual stages) per rank.
    """

    def __init__(self, ps: ParallelState, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, num_chunks: int):
        self.ps, self.shape, self.dtype, self.device = ps, tuple(shape), dtype, device
        self.num_virtual = ps.pp_size * num_chunks
        self._in_flight: list[tuple[dist.Work, Tensor]] = []
        ranks = ps.pp_group_ranks
        self.early_receives = dist.get_backend(ps.pp_group) != "nccl"
        """Whether the schedule may post receives one exchange step early (tagged matching)."""
        self._next = ranks[(ps.pp_rank + 1) % ps.pp_size]
        self._prev = ranks[(ps.pp_rank - 1) % ps.pp_size]
        if ps.pp_group not in _NCCL_READY and dist.get_backend(ps.pp_group) == "nccl":
            # batch_isend_irecv must not be the first call on an NCCL group unless every member
            # takes part (communicators are created lazily); one tiny collective over the
            # pipeline group, the first time a schedule runs on it, guarantees that.
            dist.all_reduce(torch.zeros(1, device=device), group=ps.pp_group)
            _NCCL_READY.add(ps.pp_group)

    def virtual_stage(self, chunk: int) -> int:
        """Position of this rank's ``chunk`` in the chain of virtual stages."""
        return chunk * self.ps.pp_size + self.ps.pp_rank

    def _tag(self, lower_virtual_stage: int, microbatch: int, kind: int) -> int:
        # One tag per (edge lower -> lower + 1, microbatch, kind). Both ends compute it from
        # the edge, not from their own chunk index (which differs across the ring's wrap).
        return (microbatch * self.num_virtual + lower_virtual_stage) * 2 + kind

    def exchange(self, sends: list[tuple[str, Tensor, int, int]],
                 recvs: list[tuple[str, int, int]]) -> dict[tuple[str, int, int], "Incoming"]:
        """Post ``sends`` and ``recvs`` as one ``batch_isend_irecv`` group.

        ``sends``: ``(direction, tensor, chunk, microbatch)``; ``recvs``: ``(direction, chunk,
        microbatch)``. direction ``"forward"``: the activation leaving (send) / entering (recv)
        this rank's ``chunk``; ``"backward"``: the gradient w.r.t. that chunk's input (send) /
        output (recv). Returns, per receive, an :class:`Incoming` whose ``get()`` waits for the
        tensor; sends stay in flight until :meth:`wait_sends`.
        """
        ops = []
        for direction, tensor, chunk, microbatch in sends:
            t = tensor.detach()
            if t.shape != self.shape or t.dtype != self.dtype:
                raise RuntimeError(f"pipeline send of shape {tuple(t.shape)} {t.dtype}; the "
                                   f"schedule expects {self.shape} {self.dtype}")
            peer, tag = self._route(direction, chunk, microbatch, sending=True)
            ops.append(dist.P2POp(dist.isend, t.contiguous(), peer, self.ps.pp_group, tag))
        bufs = []
        for direction, chunk, microbatch in recvs:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            peer, tag = self._route(direction, chunk, microbatch, sending=False)
            ops.append(dist.P2POp(dist.irecv, buf, peer, self.ps.pp_group, tag))
            bufs.append(buf)
        if not ops:
            return {}
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):
            # NCCL coalesces the group into a single work that stands for every operation
            works = [works[-1]] * len(ops)
        n = len(sends)
        # the send buffers must outlive the transfers
        self._in_flight += [(w, op.tensor) for w, op in zip(works[:n], ops[:n])]
        return {key: Incoming(buf, work) for key, buf, work in zip(recvs, bufs, works[n:])}

    def _route(self, direction: str, chunk: int, microbatch: int,
               sending: bool) -> tuple[int, int]:
        """(peer global rank, tag) of a message. Activations flow to the next virtual stage,
        gradients to the previous one; the tag names the edge by its lower virtual stage."""
        v = self.virtual_stage(chunk)
        if direction == "forward":     # edge (v -> v + 1) when sending, (v - 1 -> v) receiving
            return ((self._next, self._tag(v, microbatch, _ACTIVATION)) if sending else
                    (self._prev, self._tag(v - 1, microbatch, _ACTIVATION)))
        if direction == "backward":    # edge (v - 1 <- v) when sending, (v <- v + 1) receiving
            return ((self._prev, self._tag(v - 1, microbatch, _GRADIENT)) if sending else
                    (self._next, self._tag(v, microbatch, _GRADIENT)))
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")

    def wait_sends(self) -> None:
        """Block until every send of this run has completed (call before returning)."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight.clear()
