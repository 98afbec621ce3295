"""Global gradient norm over every rank, each parameter counted exactly once, and clipping.

Which rank holds what (see ``megalite.parallel.layers``):

* tensor-split parameters (``tensor_parallel_dim`` set): each tp rank holds a different shard,
  so every tp rank contributes its shard's squared norm;
* replicated parameters (norms, biases of row-parallel layers, position tables): identical on
  every tp rank after the sequence-parallel sum, so only tp_rank 0 contributes;
* the last pipeline stage's copy of a tied word embedding (``shared_embedding``): after the
  embedding-group sum it equals the first stage's copy, which is counted there; never here;
* data-parallel replicas hold identical (averaged) gradients: the sum runs over the
  model-parallel (tp x pp) group only;
* expert parameters (``is_expert``, with expert parallelism): each rank of the expert-parallel
  group holds different experts, so their squared norms (and inf/nan flag) are first summed over
  ``ps.ep_group``, then join the tp x pp sum like the rest.

The squared norms are summed over ``ps.mp_group``; the result is the same float on every rank
of the world, so decisions taken from it (skip on inf/nan, the clip factor) agree everywhere.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState

__all__ = ["counts_toward_norm", "grad_norm_tensor", "clip_by_global_norm"]


def counts_toward_norm(param: Tensor, ps: ParallelState) -> bool:
    """True when this rank's copy of ``param`` is the one counted in the global norm."""
    if getattr(param, "shared_embedding", False):
        return False
    return getattr(param, "tensor_parallel_dim", None) is not None or ps.tp_rank == 0


def grad_norm_tensor(params: Iterable[Tensor], grads: Iterable[Tensor], ps: ParallelState
                     ) -> Tensor:
    """L2 norm of the full model's gradient, a 0-dim tensor on the gradients' device (fp32 in
    a single process, fp64 across ranks; inf when any gradient is inf/nan), never read back to
    the host. ``grads[i]`` is the gradient of ``params[i]`` (``.grad`` or an fp32
    ``main_grad``). Collective over ``ps.mp_group`` when it has >1 rank.

    Computed as torch's ``clip_grad_norm_`` does (norm of the per-tensor norms, fp32), so a
    single process gives the same float; across ranks the squared partial norms are summed.
    inf/nan in ANY gradient on any rank of the tp x pp group, counted or not (a replicated
    copy on tp rank 1 may overflow where tp rank 0's did not), gives a non-finite result on
    all of them: the overflow flag travels in the same all-reduce as the squared norm.
    """
    params, grads = list(params), list(grads)
    device = grads[0].device if grads else torch.device("cpu")
    if getattr(ps, "ep_size", 1) > 1:
        return _norm_with_expert_parallelism(params, grads, ps, device)
    norms = [torch.linalg.vector_norm(g.detach().float(), 2.0)
             for p, g in zip(params, grads) if counts_toward_norm(p, ps)]
    local = (torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms
             else torch.zeros((), dtype=torch.float32, device=device))
    # Uncounted gradients are checked for inf/nan too (counted ones show up in `local`);
    # on the device, one flag, no host sync per tensor.
    uncounted = [g for p, g in zip(params, grads) if not counts_toward_norm(p, ps)]
    bad = (torch.stack([torch.isfinite(g).all() for g in uncounted]).logical_not().any()
           .double() if uncounted else torch.zeros((), dtype=torch.float64, device=device))
    if ps.mp_group is None or len(ps.mp_group_ranks) == 1:
        return torch.where(bad > 0, float("inf"), local)
    # float64 for the cross-rank sum: squaring an fp32 norm near 1e19 would overflow fp32.
    total = torch.stack([local.double() ** 2, bad.to(local.device)])
    dist.all_reduce(total, group=ps.mp_group)
    return _norm_of(total)


def _norm_of(total: Tensor) -> Tensor:
    """sqrt of the squared-norm sum ``total[0]``, or inf when the flag ``total[1]`` is set."""
    return torch.where(total[1] > 0, float("inf"), total[0].sqrt())


def _squared_norm_and_flag(params: list[Tensor], grads: list[Tensor], ps: ParallelState,
                           device) -> Tensor:
    """[sum of the counted gradients' squared norms, 1.0 if any gradient is inf/nan] (fp64)."""
    sq = torch.zeros((), dtype=torch.float64, device=device)
    bad = torch.zeros((), dtype=torch.float64, device=device)
    for p, g in zip(params, grads):
        if counts_toward_norm(p, ps):
            sq = sq + torch.linalg.vector_norm(g.detach().float(), 2.0).double() ** 2
        else:
            bad = torch.maximum(bad, torch.isfinite(g).all().logical_not().double())
    return torch.stack([sq, bad])


def _norm_with_expert_parallelism(params: list[Tensor], grads: list[Tensor], ps: ParallelState,
                                  device) -> Tensor:
    """The global norm when experts are split over ``ps.ep_group``: expert squared norms are
    summed over it first, then everything over tp x pp (see the module docstring)."""
    expert = [getattr(p, "is_expert", False) for p in params]
    dense = _squared_norm_and_flag([p for p, e in zip(params, expert) if not e],
                                   [g for g, e in zip(grads, expert) if not e], ps, device)
    moe = _squared_norm_and_flag([p for p, e in zip(params, expert) if e],
                                 [g for g, e in zip(grads, expert) if e], ps, device)
    dist.all_reduce(moe, group=ps.ep_group)
    total = dense + moe
    if ps.mp_group is not None and len(ps.mp_group_ranks) > 1:
        dist.all_reduce(total, group=ps.mp_group)
    # a non-finite counted norm shows up in the squared sum itself: inf either way
    return _norm_of(torch.stack([total[0], total[1] + total[0].isfinite().logical_not()]))


@torch.no_grad()
def clip_by_global_norm(grads: list[Tensor], total_norm: Tensor | float, max_norm: float
                        ) -> Tensor:
    """Scale ``grads`` in place by ``max_norm / (total_norm + 1e-6)`` clamped to at most 1
    (torch's ``clip_grad_norm_`` rule and fp32 arithmetic, so a single process matches it
    bitwise; a factor of exactly 1 leaves every value as it was). ``max_norm <= 0`` disables
    clipping; a non-finite norm (a step to be skipped) leaves the gradients alone. Computed on
    the device, no host sync. Returns the factor applied (a 0-dim fp32 tensor)."""
    device = grads[0].device if grads else torch.device("cpu")
    norm = torch.as_tensor(total_norm, device=device).float()
    if max_norm <= 0:
        return torch.ones((), dtype=torch.float32, device=device)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    coef = torch.where(norm.isfinite(), coef, 1.0)
    torch._foreach_mul_(grads, coef)
    return coef
