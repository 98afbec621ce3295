"""Token dispatch for a mixture-of-experts layer whose experts are all on this rank.

The dispatcher interface (shared with the expert-parallel all-to-all dispatcher in
:mod:`megalite.parallel.expert_dispatch`):

* ``dispatch(hidden [T, h], probs [T, k] fp32, expert_ids [T, k] int64)`` ->
  ``(expert_input [N, h], tokens_per_local_expert [E_local] int64)``: one row per assignment
  to a local expert, grouped by local expert in local-expert order (within an expert: token
  order, then slot). An expert id of -1 is a dropped assignment (capacity): not sent.
* ``combine(expert_output [N, h]) -> [T, h]``: each row weighted by its ``probs`` and summed
  back into its token, over the ``k`` slots in slot order (so the sum's order, and its
  rounding, do not depend on where the experts ran). Differentiable in ``hidden``, ``probs``
  and ``expert_output``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LocalDispatcher"]


class LocalDispatcher:
    """All ``num_experts`` experts local (no communication); one dispatch/combine pair at a
    time (the state between them is the permutation of the last dispatch)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._state = None

    def dispatch(self, hidden: Tensor, probs: Tensor, expert_ids: Tensor
                 ) -> tuple[Tensor, Tensor]:
        num_tokens, k = expert_ids.shape
        flat_ids = expert_ids.reshape(-1)
        # stable: within an expert, assignments stay in (token, slot) order; dropped (-1) first
        order = torch.sort(flat_ids, stable=True).indices
        dropped = int((flat_ids < 0).sum()) if flat_ids.numel() else 0
        order = order[dropped:]
        counts = torch.bincount(flat_ids[order], minlength=self.num_experts)
        self._state = (order, probs.reshape(-1)[order], num_tokens, k)
        return hidden[order // k], counts

    def combine(self, expert_output: Tensor) -> Tensor:
        order, probs, num_tokens, k = self._state
        self._state = None
        weighted = expert_output * probs.unsqueeze(-1).to(expert_output.dtype)
        slots = expert_output.new_zeros(num_tokens * k, expert_output.shape[-1])
        slots = slots.index_copy(0, order, weighted)
        return slots.view(num_tokens, k, -1).sum(dim=1)
