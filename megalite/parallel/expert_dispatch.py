"""Token dispatch for expert parallelism: tokens travel to the rank holding their expert by
all-to-all over ``ps.ep_group`` and come back the same way.

:class:`AllToAllDispatcher` has the interface of the MoE layer's local dispatcher
(``megalite.model.moe_dispatch``; agreed in ``model/moe.py``'s docstring), so the layer picks
it when ``ps.ep_size > 1`` and nothing else changes::

    expert_input, tokens_per_local_expert = dispatcher.dispatch(hidden, probs, expert_ids)
    #   hidden [T, h], probs [T, k] fp32, expert_ids [T, k] int64 (global expert ids)
    #   -> expert_input [N, h]: the rows of this rank's local experts, grouped by local expert
    #      (local expert j = global expert ep_rank * E_local + j), tokens_per_local_expert [E_local]
    output = dispatcher.combine(expert_output)        # [N, h] -> [T, h]

Steps (E experts, P = ep_size ranks, L = E / P local experts each):

1. *Permute*: the T*k (token, choice) pairs are sorted by global expert id with a stable sort,
   so each expert's rows keep the token order; since a rank's experts are consecutive ids, the
   rows for rank r are one contiguous block.
2. *Counts*: one all-to-all of the per-expert counts [E] tells every rank how many rows it
   receives from each source for each of its local experts ([P, L]).
3. *Tokens*: one all-to-all of the rows (autograd-aware: its backward is the reverse
   all-to-all of the gradients). The received rows are ordered (source, local expert) and are
   regrouped into (local expert, source) order: each expert sees source 0's tokens, then
   source 1's..., exactly the rows a single process would give it for the concatenated batch,
   which is why every layout routes and computes the same thing.
4. *Combine*: the inverse of 3 (regroup back, reverse all-to-all), then each token's output is
   ``sum_j probs[t, j] * expert_output(t, j)`` summed over the slots j in slot order, with the
   local dispatcher's arithmetic (:mod:`megalite.model.moe_dispatch`), so that a token's sum
   rounds the same in every layout. Dropped assignments (expert id -1, capacity) are not sent
   and contribute zero.

A token whose k choices land on the same rank is sent k times (one row per choice, as
Megatron's all-to-all dispatcher does); ``benchmarks/moe_alltoall.py`` measures the bytes.
With ``ep_size == 1`` no collective runs (the all-to-alls are the identity).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError

__all__ = ["AllToAllDispatcher", "all_to_all"]


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``input_splits`` go to the ranks of ``group``; rank r receives
    ``output_splits[r]`` rows from r. Backward: the same with the splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        return _all_to_all_rows(grad, input_splits, output_splits, ctx.group), None, None, None


@torch.no_grad()
def _all_to_all_rows(x: Tensor, output_splits: list[int], input_splits: list[int],
                     group) -> Tensor:
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Autograd-aware all-to-all of the rows (dim 0) of ``x`` [n, ...] over ``group``:
    ``input_splits[r]`` consecutive rows go to rank r, ``output_splits[r]`` arrive from it."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class AllToAllDispatcher:
    """Dispatch/combine over the expert-parallel group (module docstring).

    Args:
        num_experts: E, the global number of experts (divisible by ``ps.ep_size``).
        ps: the parallel state; ``ps.ep_group`` carries the tokens, ``ps.ep_rank`` says which
            experts are local.

    One ``dispatch`` must be followed by its ``combine`` before the next ``dispatch`` (the layer
    does both in one forward; recompute repeats both).
    """

    def __init__(self, num_experts: int, ps: ParallelState):
        ep = getattr(ps, "ep_size", 1)
        if num_experts % ep:
            raise MegaliteError(f"--expert-model-parallel-size {ep} does not divide "
                                f"--num-experts {num_experts}")
        self.num_experts, self.ep_size, self.ps = num_experts, ep, ps
        self.num_local_experts = num_experts // ep
        self._state: tuple | None = None

    def _exchange(self, x: Tensor, output_splits: list[int], input_splits: list[int]) -> Tensor:
        if self.ep_size == 1:
            return x
        return all_to_all(x, output_splits, input_splits, self.ps.ep_group)

    def dispatch(self, hidden: Tensor, probs: Tensor, expert_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``hidden`` [T, h], ``probs`` [T, k] (fp32), ``expert_ids`` [T, k] (int64, global)
        -> (``expert_input`` [N, h] grouped by local expert, ``tokens_per_local_expert`` [L])."""
        if (hidden.dim() != 2 or probs.shape != expert_ids.shape
                or probs.shape[0] != hidden.shape[0]):
            raise MegaliteError(f"dispatch expects hidden [T, h], probs and expert_ids [T, k]; "
                                f"got {tuple(hidden.shape)}, {tuple(probs.shape)}, "
                                f"{tuple(expert_ids.shape)}")
        E, P, L = self.num_experts, self.ep_size, self.num_local_experts
        num_tokens, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        # stable: within an expert, assignments stay in (token, slot) order; dropped ones (-1,
        # capacity) sort first and are not sent (as the local dispatcher)
        order = torch.sort(flat, stable=True).indices
        dropped = int((flat < 0).sum()) if flat.numel() else 0
        order = order[dropped:]
        counts = torch.bincount(flat[order], minlength=E)   # [E] rows per global expert
        if counts.numel() != E:
            raise MegaliteError(f"expert ids must lie in [0, {E}), got max {int(flat.max())}")
        rows = hidden[torch.div(order, k, rounding_mode="floor")]   # [n, h] by global expert
        if P == 1:
            recv = counts.view(1, L)
        else:
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts, group=self.ps.ep_group)   # L counts per rank
            recv = recv.view(P, L)                       # [source, local expert]
        send_splits = counts.view(P, L).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        received = self._exchange(rows, recv_splits, send_splits)   # [N, h] (source, expert)
        # regroup (source, local expert) -> (local expert, source): sort the chunk of every
        # received row by its (expert, source) key; stable, so rows keep their order
        chunk = torch.repeat_interleave(torch.arange(P * L, device=recv.device), recv.reshape(-1))
        key = (chunk % L) * P + torch.div(chunk, L, rounding_mode="floor")
        perm = torch.sort(key, stable=True).indices
        self._state = (perm, send_splits, recv_splits, order, probs.reshape(-1)[order],
                       num_tokens, k)
        return received.index_select(0, perm), recv.sum(0)

    def combine(self, expert_output: Tensor) -> Tensor:
        """``expert_output`` [N, h] (rows as ``dispatch`` returned them) -> [T, h]: each
        token's probability-weighted sum of its k experts' outputs."""
        if self._state is None:
            raise MegaliteError("combine called without a dispatch before it")
        perm, send_splits, recv_splits, order, probs, num_tokens, k = self._state
        self._state = None
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        back = self._exchange(expert_output[inverse], send_splits, recv_splits)   # [n, h]
        # the local dispatcher's arithmetic, so every layout rounds alike: weight in the
        # output's dtype, rows back into (token, slot) order (dropped slots zero), sum the k
        # slots in slot order
        weighted = back * probs.unsqueeze(-1).to(back.dtype)
        slots = back.new_zeros(num_tokens * k, back.shape[-1]).index_copy(0, order, weighted)
        return slots.view(num_tokens, k, -1).sum(dim=1)
