"""Cross-entropy over a vocabulary split across tensor-parallel ranks.

Each TP rank holds logits for its vocabulary slice ``[r*V/tp, (r+1)*V/tp)``. The loss

    loss = log(sum_v exp(z_v)) - z_target

needs only three scalars per token from the other ranks: the global max (for a stable
log-sum-exp), the sum of exponentials, and the target's logit (non-zero on the one rank that owns
the target id). So the full ``[tokens, V]`` logits are never gathered: communication is
``3 * tokens`` numbers instead of ``tokens * V``.

Gradient w.r.t. this rank's logits: ``softmax(z)_v - [v == target]`` restricted to the slice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ps: ParallelState):
        # At least fp32 math whatever the logits' dtype (bf16 logits lose the loss otherwise).
        compute = torch.promote_types(logits.dtype, torch.float32)
        z = logits.to(compute)
        local_vocab = z.shape[-1]
        start = ps.tp_rank * local_vocab

        z_max = z.amax(dim=-1)
        if ps.tp_size > 1:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=ps.tp_group)
        z = z - z_max.unsqueeze(-1)

        local_target = target - start
        outside = (local_target < 0) | (local_target >= local_vocab)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)

        exp_z = z.exp_()  # z is our own copy: reuse its memory for the exponentials
        sum_exp = exp_z.sum(dim=-1)
        if ps.tp_size > 1:
            # One collective for both sums (target_logit is non-zero on exactly one rank).
            both = torch.stack([sum_exp, target_logit])
            dist.all_reduce(both, group=ps.tp_group)
            sum_exp, target_logit = both[0], both[1]

        loss = sum_exp.log() - target_logit
        softmax = exp_z.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        softmax, local_target, outside = ctx.saved_tensors
        # In place: the saved softmax is needed by no one else (saves a [tokens, V/tp] copy);
        # a second backward through this graph fails autograd's version check (no silent error).
        grad = softmax
        # Subtract 1 at the target position, only on the rank that owns the target id.
        grad.scatter_add_(-1, local_target.unsqueeze(-1),
                          (outside.to(grad.dtype) - 1.0).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, ps: ParallelState) -> Tensor:
    """Per-token cross-entropy with the vocabulary split over TP.

    ``logits [..., V/tp]``: this rank's vocabulary slice (any float dtype; math in >= fp32).
    ``target [...]``: global token ids in ``[0, V)``, identical on all TP ranks.
    Returns the per-token loss ``[...]`` (fp32 or fp64), identical on all TP ranks; differentiable
    w.r.t. ``logits``. Collective over the TP group (none when ``tp_size == 1``).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                         f"disagree on the token dimensions")
    if ps.tp_size > 1:   # collectives: eager under --compile (megalite.parallel.comm._apply)
        return _eager_apply(logits, target, ps)
    return _VocabParallelCrossEntropy.apply(logits, target, ps)


@torch.compiler.disable
def _eager_apply(logits: Tensor, target: Tensor, ps: ParallelState) -> Tensor:
    return _VocabParallelCrossEntropy.apply(logits, target, ps)
