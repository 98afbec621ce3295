"""The mixture-of-experts router: which ``k`` experts each token goes to, with which weights,
and the load-balancing losses.

Routing of ``T`` tokens over ``E`` experts (everything in fp32, whatever the model's dtype):

* ``logits = x W_r^T`` [T, E] (``W_r`` = ``router.weight`` [E, h], no bias), computed in fp32;
* ``scores = softmax(logits)`` [T, E]; the top ``k`` experts of each token are the ``k``
  largest scores, **ties broken towards the lower expert id** (a stable descending sort), so
  the same scores give the same experts in every layout and on every device;
* weights (``probs`` [T, k]): with ``moe_router_pre_softmax`` the selected scores as they are
  (Qwen2-MoE's ``norm_topk_prob: false``), else renormalised to sum to 1 over the ``k``
  selected (top-k renormalisation: Mixtral, Qwen3-MoE's ``norm_topk_prob: true``, Megatron's
  softmax over the top-k logits; the same values up to rounding);
* ``moe_expert_capacity_factor`` c (optional): each expert takes at most
  ``ceil(c * T * k / E)`` of its assignments, those with the highest scores (ties: the lower
  token index); the others are dropped: expert id -1, weight 0 (Megatron's "probs" drop
  policy, without padding to the capacity). Without it routing is dropless.

Losses (scalars, fp32, already multiplied by their coefficients; the trainer backpropagates
them through :mod:`megalite.model.moe`):

* ``aux_loss`` (Switch Transformer / Megatron): ``coeff * E / (T * k) * sum_e f_e * P_e`` where
  ``f_e`` is the number of assignments to expert e (before dropping) and ``P_e`` the mean
  score of e over the tokens;
* ``seq_aux_loss``: the same per sequence (``T = s`` tokens of one sample), averaged over the
  batch (Megatron's sequence-level variant, DeepSeek-V2);
* z-loss (ST-MoE): ``coeff * mean_t logsumexp(logits_t)^2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Routing", "route", "topk_stable", "load_balancing_loss", "seq_load_balancing_loss",
           "z_loss", "expert_capacity", "router_logits"]


@dataclass
class Routing:
    """The result of :func:`route` for ``T`` tokens.

    ``probs`` [T, k] fp32 (0 where dropped), ``expert_ids`` [T, k] int64 (-1 where dropped),
    ``tokens_per_expert`` [E] int64 (assignments before dropping), ``aux_loss`` and ``z_loss``
    fp32 scalars (0 when off)."""

    probs: Tensor
    expert_ids: Tensor
    tokens_per_expert: Tensor
    aux_loss: Tensor
    z_loss: Tensor


def topk_stable(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest values of each row of ``scores`` [T, E] and their indices ([T, k]
    each), equal values ordered by lower index first (``torch.topk`` leaves ties unspecified)."""
    values, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], idx[:, :k]


def expert_capacity(num_tokens: int, num_experts: int, topk: int, factor: float) -> int:
    """Assignments one expert takes: ``ceil(factor * T * k / E)`` (Megatron's formula)."""
    return math.ceil(factor * num_tokens * topk / num_experts)


def load_balancing_loss(scores: Tensor, tokens_per_expert: Tensor, topk: int,
                        coeff: float) -> Tensor:
    """Switch-style aux loss of ``scores`` [T, E] (softmax over all experts) and the
    assignment counts [E] (module doc)."""
    num_tokens, num_experts = scores.shape
    mean_scores = scores.sum(dim=0)
    return (mean_scores * tokens_per_expert.to(scores.dtype)).sum() * (
        coeff * num_experts / (num_tokens * num_tokens * topk))


def seq_load_balancing_loss(scores: Tensor, expert_ids: Tensor, seq_length: int, batch: int,
                            topk: int, coeff: float) -> Tensor:
    """Per-sequence aux loss, averaged over the batch: ``scores`` [s*b, E] and ``expert_ids``
    [s*b, k] in the model's [s, b] token order."""
    num_experts = scores.shape[1]
    counts = torch.zeros(seq_length, batch, num_experts, dtype=scores.dtype,
                         device=scores.device)
    counts.view(-1, num_experts).scatter_add_(
        1, expert_ids, torch.ones_like(expert_ids, dtype=scores.dtype))
    f = counts.sum(dim=0) * (num_experts / (seq_length * topk))       # [b, E]
    p = scores.view(seq_length, batch, num_experts).mean(dim=0)       # [b, E]
    return (f * p).sum(dim=1).mean() * coeff


def z_loss(logits: Tensor, coeff: float) -> Tensor:
    """ST-MoE router z-loss of ``logits`` [T, E]."""
    return torch.logsumexp(logits, dim=-1).square().mean() * coeff


def _drop_over_capacity(scores_topk: Tensor, expert_ids: Tensor, num_experts: int,
                        capacity: int) -> Tensor:
    """A [T, k] bool mask of the assignments kept: per expert the ``capacity`` highest
    scores (ties: lower token index, then lower slot)."""
    flat_ids, flat_scores = expert_ids.reshape(-1), scores_topk.reshape(-1)
    # order by (expert id ascending, score descending, position ascending): two stable sorts
    by_score = torch.sort(flat_scores, descending=True, stable=True).indices
    order = by_score[torch.sort(flat_ids[by_score], stable=True).indices]
    sorted_ids = flat_ids[order]
    counts = torch.bincount(sorted_ids, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_ids]
    keep = torch.empty_like(flat_ids, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(expert_ids)


def route(logits: Tensor, topk: int, *, pre_softmax: bool = False,
          load_balancing_type: str = "aux_loss", aux_loss_coeff: float = 0.0,
          z_loss_coeff: float | None = None, capacity_factor: float | None = None,
          seq_batch: tuple[int, int] | None = None) -> Routing:
    """Route ``T`` tokens given their fp32 router ``logits`` [T, E] (module doc).

    ``seq_batch``: ``(s, b)`` with ``s * b == T`` (the tokens in [s, b] order), needed for
    ``seq_aux_loss``. The losses are computed (and differentiable) only when their
    coefficient is non-zero; otherwise they are zero tensors."""
    logits = logits.float()
    num_tokens, num_experts = logits.shape
    scores = torch.softmax(logits, dim=-1)
    top, expert_ids = topk_stable(scores, topk)
    probs = top if pre_softmax else top / top.sum(dim=-1, keepdim=True)
    tokens_per_expert = torch.bincount(expert_ids.reshape(-1), minlength=num_experts)
    zero = logits.new_zeros(())
    aux = zero
    if aux_loss_coeff and load_balancing_type == "aux_loss":
        aux = load_balancing_loss(scores, tokens_per_expert, topk, aux_loss_coeff)
    elif aux_loss_coeff and load_balancing_type == "seq_aux_loss":
        s, b = seq_batch
        aux = seq_load_balancing_loss(scores, expert_ids, s, b, topk, aux_loss_coeff)
    z = z_loss(logits, z_loss_coeff) if z_loss_coeff else zero
    if capacity_factor is not None:
        cap = expert_capacity(num_tokens, num_experts, topk, capacity_factor)
        keep = _drop_over_capacity(top.detach(), expert_ids, num_experts, cap)
        probs = probs * keep
        expert_ids = expert_ids.masked_fill(~keep, -1)
    return Routing(probs, expert_ids, tokens_per_expert, aux, z)


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """fp32 router logits ``x`` [T, h] -> [T, E] for ``weight`` [E, h] (any dtypes)."""
    return F.linear(x.float(), weight.float())
