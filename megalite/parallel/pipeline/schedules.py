"""Pipeline schedules: the order in which a rank runs forward (F) and backward (B) passes.

One function, :func:`forward_backward`, runs a whole global batch share (``num_microbatches``
microbatches) through this rank's model chunks and picks the schedule:

* no pipelining (pp = 1): ``F0 B0 F1 B1 ...``, gradients accumulate across microbatches;
* 1F1B (pp > 1, one chunk per rank);
* interleaved 1F1B (pp > 1, several chunks per rank = virtual stages).

The schedule is computed first, as plain lists of ``(kind, chunk, microbatch)`` steps
(:func:`schedule_steps`, pure and unit-tested), then executed by one small loop; the
point-to-point traffic follows from the steps (:mod:`megalite.parallel.pipeline.p2p`): before
each *exchange step* (a lone warm-up forward, a steady-state forward + backward pair, a lone
cool-down backward) one group posts the previous step's sends and this step's receives. 1F1B with
pp = 4, 6 microbatches (``Fm`` / ``Bm``: forward / backward of microbatch m; time runs right)::

    stage 0:  F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5
    stage 1:     F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5
    stage 2:        F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5
    stage 3:           F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5
              |warm-up|   steady: one F, one B   | cool-down |

Warm-up: stage r runs ``pp - r - 1`` forwards before its first backward, just enough to keep
the later stages busy; steady state alternates one forward and one backward, so at most
``pp - r`` microbatches' activations are alive at once (not ``num_microbatches``); cool-down
drains the remaining backwards.

Interleaved (vp chunks per rank): the forward order walks ``pp`` microbatches through chunk 0,
then the same ``pp`` through chunk 1, ..., then the next group of ``pp`` microbatches (hence
``num_microbatches % pp == 0``); backward walks the chunks in reverse. Warm-up is
``2 (pp - r - 1) + (vp - 1) pp`` forwards. pp = 2, vp = 2, 4 microbatches, ``Fm.c`` = chunk c::

    stage 0:  F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0
    stage 1:  F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0

On the last stage the schedule hands each microbatch's output to the loss object
(:class:`MicrobatchLoss`, e.g. :class:`megalite.training.loss.GPTLoss`), which returns what to
backpropagate (divided by the number of microbatches, times the loss scale) and what to report.

Exactness: each microbatch goes through exactly the layers and operations of the unsplit model
(only where they run changes), its loss is scaled by ``1 / num_microbatches`` and the gradients
of the microbatches accumulate in the same order (0, 1, ...) on every chunk. Results therefore
equal running all microbatches through the full model in one process up to float32 reduction
order (the only re-associations are the tied-embedding sum of the two stages' gradients and
autograd's accumulation order inside a stage): measured max gradient error 2e-7 of the
tensor's scale at pp 2-4 (tests/distributed/test_pipeline.py), losses bit-identical.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.parallel.pipeline.p2p import P2P

__all__ = ["MicrobatchLoss", "forward_backward", "schedule_order", "schedule_steps"]


class MicrobatchLoss(Protocol):
    """The loss of one step, called by the schedule once per microbatch on the last stage."""

    def __call__(self, output: Tensor, microbatch: dict) -> tuple[Tensor, Tensor]:
        """(the last chunk's output, e.g. the per-token loss [b, s]; the microbatch dict) ->
        (the scalar to backpropagate, already divided by the number of microbatches and
        multiplied by the loss scale; the detached, unscaled value to report)."""

Step = tuple[str, int, int]   # ("F" | "B", chunk, microbatch)


def _warmup(P: int, r: int, V: int, total: int) -> int:
    """Forwards stage ``r`` runs before its first backward."""
    if P == 1:
        return 0                                   # no pipelining: F0 B0 F1 B1 ...
    if V == 1:
        return min(P - r - 1, total)               # 1F1B
    return min(2 * (P - r - 1) + (V - 1) * P, total)


def schedule_steps(pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                   forward_only: bool = False) -> list[list[Step]]:
    """This rank's schedule as *exchange steps*: warm-up forwards one by one, steady-state
    (forward, backward) pairs, cool-down backwards one by one.

    Each exchange step is preceded by one p2p exchange that posts the sends of the previous
    step together with every receive this step needs (Megatron's combined
    send_forward_recv_backward & co.). Pairing the steady state's forward and backward in one
    exchange is what keeps interleaved schedules deadlock-free when sends block until received
    (NCCL); with separate exchanges two neighbours can end up both sending.

    Each (chunk, microbatch) appears once as F (and once as B unless ``forward_only``), its B
    after its F. Raises MegaliteError if interleaving (num_chunks > 1) is asked with a number
    of microbatches that is not a multiple of pp_size.
    """
    P, V, M = pp_size, num_chunks, num_microbatches
    if M < 1:
        raise MegaliteError(f"the number of microbatches must be >= 1, got {M}")
    if V > 1 and M % P:
        raise MegaliteError(
            f"interleaved pipeline schedule (--num-layers-per-virtual-pipeline-stage) needs the "
            f"number of microbatches ({M} = global batch / (micro batch x data-parallel size)) "
            f"to be a multiple of --pipeline-model-parallel-size {P}")
    total = M * V

    def unit(k: int, backward: bool) -> tuple[int, int]:
        # The k-th forward (backward) of this rank: groups of P microbatches go through
        # chunks 0..V-1 (backward: V-1..0) before the next group starts.
        chunk = (k // P) % V
        microbatch = (k // (P * V)) * P + k % P
        return (V - 1 - chunk if backward else chunk), microbatch

    forwards = [("F", *unit(k, False)) for k in range(total)]
    if forward_only:
        return [[f] for f in forwards]
    backwards = [("B", *unit(k, True)) for k in range(total)]
    warmup = _warmup(P, pp_rank, V, total)
    steady = [[forwards[warmup + k], backwards[k]] for k in range(total - warmup)]
    return ([[f] for f in forwards[:warmup]] + steady
            + [[b] for b in backwards[total - warmup:]])


def schedule_order(pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                   forward_only: bool = False) -> list[Step]:
    """Every step this rank runs, in order: ``("F" | "B", chunk, microbatch)`` (the flattened
    :func:`schedule_steps`)."""
    return [step for group in schedule_steps(pp_size, pp_rank, num_chunks, num_microbatches,
                                             forward_only) for step in group]


def _default_backward(output: Tensor, grad: Tensor | None) -> None:
    torch.autograd.backward(output, grad)


def forward_backward(model_chunks: list, microbatches: Iterator[dict], num_microbatches: int,
                     ps: ParallelState, loss: MicrobatchLoss, *, seq_length: int,
                     micro_batch_size: int, dtype: torch.dtype, forward_only: bool = False,
                     backward_fn: Callable[[Tensor, Tensor | None], None] | None = None,
                     before_last_backward: Callable[[int], None] | None = None
                     ) -> list[Tensor]:
    """Forward (and backward) ``num_microbatches`` microbatches through this rank's chunks.

    Args:
        model_chunks: this rank's chunks (:func:`~megalite.parallel.pipeline.stages.
            build_model_chunks`); one per virtual stage. Each runs a microbatch with
            ``chunk.forward_microbatch(hidden, microbatch)`` (``hidden``: the activations
            received from the previous stage, None on the first one), which returns the
            activations to send on, or on the last stage what ``loss`` takes.
        microbatches: yields the microbatch dicts of the model family (GPT: ``{"tokens": [b,
            s], "labels": [b, s]}`` int64); this function takes exactly ``num_microbatches``
            of them on every rank (each chunk reads the fields it needs).
        ps: the layout; the schedule talks to the neighbours in ``ps.pp_group``.
        loss: see :class:`MicrobatchLoss`; it owns the reduction, the division by the number
            of microbatches and the loss scale.
        seq_length, micro_batch_size, dtype: shape ``[s/(tp if SP else 1), b, h]`` and dtype
            of the activations passed between stages.
        forward_only: evaluation: no backward, no graph kept.
        backward_fn: ``backward_fn(output, grad)`` runs a backward (the optimizer's, which may
            scale or redirect gradients); default ``torch.autograd.backward``. On the last
            stage it gets ``(loss(...)[0], None)``.
        before_last_backward: called with a chunk's index just before the backward of that
            chunk's last microbatch (the optimizer's: from then on the chunk's gradients are
            final as backward produces them, so their reduction may start).

    Returns the reported losses (``loss(...)[1]``, unscaled, detached), one per microbatch
    in order, on the last pipeline stage; ``[]`` on the others. Gradients are accumulated into
    the parameters (or wherever ``backward_fn`` puts them); nothing is reduced across ranks.
    """
    num_chunks = len(model_chunks)
    if num_chunks < 1:
        raise MegaliteError("forward_backward needs at least one model chunk")
    if num_chunks > 1 and ps.pp_size == 1:
        raise MegaliteError("several model chunks (virtual pipeline stages) need "
                            "--pipeline-model-parallel-size > 1")
    backward_fn = backward_fn or _default_backward
    steps = schedule_steps(ps.pp_size, ps.pp_rank, num_chunks, num_microbatches,
                           forward_only)

    config = model_chunks[0].config
    sp = config.sequence_parallel and ps.tp_size > 1
    shape = (seq_length // (ps.tp_size if sp else 1), micro_batch_size, config.hidden_size)
    device = next(model_chunks[0].parameters()).device
    p2p = P2P(ps, shape, dtype, device, num_chunks) if ps.pp_size > 1 else None
    first = lambda c: ps.is_first_pp_stage and c == 0  # noqa: E731  (holds the embedding)
    last = lambda c: ps.is_last_pp_stage and c == num_chunks - 1  # noqa: E731  (the loss)

    batches: list[dict] = []            # microbatches taken so far, in order

    def batch(m: int) -> dict:
        while len(batches) <= m:
            try:
                batches.append(next(microbatches))
            except StopIteration:
                raise MegaliteError(f"the microbatch iterator ended after {len(batches)} "
                                    f"microbatches; {num_microbatches} were expected") from None
        return batches[m]

    losses: list[Tensor] = []
    saved: dict[tuple[int, int], tuple[Tensor | None, Tensor]] = {}   # (chunk, m) -> (in, out)
    # Before each exchange step: post the sends of the previous one with this one's receives
    # (alone right away when there are none: better overlap, and still deadlock-free). On gloo
    # (tagged messages, any order matches) each step's receives are posted one step early
    # instead, so the data arrives while this rank computes (parallel/pipeline/p2p.py).
    needs_of = []
    for group in steps:
        needs = []
        for kind, c, m in group:
            if kind == "F" and not first(c):
                needs.append(("forward", c, m))
            elif kind == "B" and not last(c):
                needs.append(("backward", c, m))
        needs_of.append(needs)
    early = p2p is not None and p2p.early_receives
    ahead = p2p.exchange([], needs_of[0]) if early and needs_of[0] else {}
    pending: list = []
    with torch.set_grad_enabled(not forward_only):
        for i, group in enumerate(steps):
            if early:
                received = ahead
                if pending:
                    p2p.exchange(pending, [])
                later = needs_of[i + 1] if i + 1 < len(steps) else []
                ahead = p2p.exchange([], later) if later else {}
            else:
                needs = needs_of[i]
                received = p2p.exchange(pending, needs) if (pending or needs) else {}
            pending = []
            for kind, c, m in group:
                if kind == "F":
                    mb = batch(m)
                    x = received[("forward", c, m)].get() if not first(c) else None
                    if x is not None and not forward_only:
                        x.requires_grad_()
                    out = model_chunks[c].forward_microbatch(x, mb)
                    if last(c):
                        out, reported = loss(out, mb)
                        losses.append(reported.detach())
                    else:
                        pending.append(("forward", out, c, m))
                    if not forward_only:
                        saved[(c, m)] = (x, out)
                else:
                    x, out = saved.pop((c, m))
                    grad = received[("backward", c, m)].get() if not last(c) else None
                    if before_last_backward is not None and m == num_microbatches - 1:
                        before_last_backward(c)
                    backward_fn(out, grad)
                    if not first(c):
                        if x.grad is None:   # the chunk's output did not depend on its input
                            x.grad = torch.zeros_like(x)
                        pending.append(("backward", x.grad, c, m))
    if p2p is not None:
        if pending:
            p2p.exchange(pending, [])
        p2p.wait_sends()
    # Every rank consumes exactly num_microbatches items, so iterators stay aligned.
    batch(num_microbatches - 1)
    return losses if ps.is_last_pp_stage else []
