"""Point-to-point transfer of activations and gradients between adjacent pipeline stages.

Messages run along the edges of the chain of *virtual stages* ``v = chunk * pp + pp_rank``
(``v`` and ``v + 1`` are on adjacent ranks; the last rank's chunk ``c`` feeds rank 0's chunk
``c + 1``, so the physical ranks form a ring when interleaving):

* activation of microbatch ``m``: virtual stage ``v`` -> ``v + 1`` (rank ``r`` -> ``r + 1 mod pp``)
* gradient of that activation:    virtual stage ``v + 1`` -> ``v`` (rank ``r + 1 mod pp`` -> ``r``)

Every tensor has the fixed shape ``[s / (tp if sequence parallel else 1), micro_batch, hidden]``
and the activation dtype, so no shape is ever exchanged.

Sends are asynchronous (``isend``; the tensor is kept alive until :meth:`P2P.wait_sends`),
receives block. With that, any schedule whose per-rank order respects the data dependencies
cannot deadlock, whatever the transport does internally: a rank only ever waits for a message
that its peer will send without waiting for anything this rank has not yet done. Each message
carries a tag unique to its (edge, microbatch, kind), so on gloo a receive can only ever match
the message meant for it, even when activations and gradients travel the same direction
between the same two ranks (pp = 2 interleaved). NCCL ignores tags and matches in posting
order per rank pair; our schedules post the sends of each (rank pair, kind) in the same order
as the peer posts the receives (checked by tests/unit/test_pipeline_stages.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState

__all__ = ["P2P"]

_ACTIVATION, _GRADIENT = 0, 1


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
        self._next = ranks[(ps.pp_rank + 1) % ps.pp_size]
        self._prev = ranks[(ps.pp_rank - 1) % ps.pp_size]

    def virtual_stage(self, chunk: int) -> int:
        """Position of this rank's ``chunk`` in the chain of virtual stages."""
        return chunk * self.ps.pp_size + self.ps.pp_rank

    def _tag(self, lower_virtual_stage: int, microbatch: int, kind: int) -> int:
        # One tag per (edge lower -> lower + 1, microbatch, kind). Both ends compute it from
        # the edge, not from their own chunk index (which differs across the ring's wrap).
        return (microbatch * self.num_virtual + lower_virtual_stage) * 2 + kind

    # -- activations (forward) ---------------------------------------------------------------
    def send_forward(self, activation: Tensor, chunk: int, microbatch: int) -> None:
        """Send this chunk's output for ``microbatch`` to the next virtual stage (async)."""
        self._send(activation, self._next,
                   self._tag(self.virtual_stage(chunk), microbatch, _ACTIVATION))

    def recv_forward(self, chunk: int, microbatch: int) -> Tensor:
        """Receive the input of ``chunk`` for ``microbatch`` from the previous virtual stage."""
        return self._recv(self._prev,
                          self._tag(self.virtual_stage(chunk) - 1, microbatch, _ACTIVATION))

    # -- gradients (backward) ----------------------------------------------------------------
    def send_backward(self, input_grad: Tensor, chunk: int, microbatch: int) -> None:
        """Send d(loss)/d(input of ``chunk``) to the previous virtual stage (async)."""
        self._send(input_grad, self._prev,
                   self._tag(self.virtual_stage(chunk) - 1, microbatch, _GRADIENT))

    def recv_backward(self, chunk: int, microbatch: int) -> Tensor:
        """Receive d(loss)/d(output of ``chunk``) from the next virtual stage."""
        return self._recv(self._next,
                          self._tag(self.virtual_stage(chunk), microbatch, _GRADIENT))

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, tensor: Tensor, dst: int, tag: int) -> None:
        t = tensor.detach()
        if t.shape != self.shape or t.dtype != self.dtype:
            raise RuntimeError(f"pipeline send of shape {tuple(t.shape)} {t.dtype}; the schedule "
                               f"expects {self.shape} {self.dtype}")
        t = t.contiguous()
        work = dist.isend(t, dst=dst, group=self.ps.pp_group, tag=tag)
        self._in_flight.append((work, t))   # the buffer must outlive the transfer

    def _recv(self, src: int, tag: int) -> Tensor:
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        dist.irecv(buf, src=src, group=self.ps.pp_group, tag=tag).wait()
        return buf

    def wait_sends(self) -> None:
        """Block until every send of this run has completed (call before returning)."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight.clear()
