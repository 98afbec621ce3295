"""The training loss: from the model's per-token loss to what is backpropagated and reported.

The last model chunk, given labels, returns the per-token cross-entropy ``[b, s]`` (computed
vocab-parallel, :mod:`megalite.parallel.cross_entropy`). Everything after that is one object
per step, which the pipeline schedule calls once per microbatch
(:class:`~megalite.parallel.pipeline.schedules.MicrobatchLoss`):

* the reduction over the microbatch's tokens (GPT pretraining: the mean, every token counts;
  with ``--eod-mask-loss`` the mean over the microbatch's ``loss_mask``);
* what is backpropagated: that mean divided by the number of microbatches (gradients
  accumulate over them into the global-batch mean) and multiplied by the loss scale (fp16);
* what is reported: the unscaled mean, detached; :meth:`GPTLoss.global_mean` turns the
  reported values of all microbatches of all data-parallel ranks into the global-batch mean.

BERT (:class:`BERTLoss`): the masked-LM loss is the mean over the microbatch's masked tokens
(``loss_mask``), plus the sentence-order cross-entropy of the binary head (mean over the
microbatch) when the model has one: Megatron-LM's ``pretrain_bert.py`` loss, per microbatch.
T5 (:class:`T5Loss`): the mean over the microbatch's decoder tokens (``loss_mask``). Other
objectives (mixture-of-experts auxiliary losses) are further classes of this shape, here; the
model family names its class (:mod:`megalite.families`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState

__all__ = ["GPTLoss", "BERTLoss", "T5Loss", "masked_token_mean"]


@dataclass(frozen=True)
class GPTLoss:
    """GPT pretraining loss of one step of ``num_microbatches`` microbatches per data-parallel
    rank, backpropagated with ``loss_scale`` (1.0 unless fp16; any value for evaluation)."""

    num_microbatches: int
    loss_scale: float = 1.0

    def __call__(self, per_token_loss: Tensor, microbatch: dict) -> tuple[Tensor, Tensor]:
        """``per_token_loss`` ``[b, s]`` -> (mean * loss_scale / num_microbatches, the mean
        detached); both fp32 scalars. The mean is over every token, or over those where the
        microbatch's ``loss_mask`` [b, s] is 1 when it has one (``--eod-mask-loss``:
        Megatron-LM's per-microbatch sum(loss * mask) / sum(mask))."""
        if "loss_denominator" in microbatch:    # context parallelism: this rank's share
            masked = (per_token_loss.float() * microbatch["loss_mask"].float()).sum()
            # (no loss token at all: the sum is 0, any positive divisor gives masked_token_mean's 0)
            loss = masked / microbatch["loss_denominator"].sum().clamp(min=1e-6)
        elif "loss_mask" in microbatch:
            loss = masked_token_mean(per_token_loss, microbatch["loss_mask"])
        else:
            loss = per_token_loss.float().mean()
        return loss * (self.loss_scale / self.num_microbatches), loss.detach()

    def local_sum(self, reported: list[Tensor], ps: ParallelState,
                  device: torch.device) -> Tensor:
        """This rank's share of the step's loss sum, float64 ``[1]``: the sum of ``reported``
        on the last pipeline stage's tp_rank 0 ranks, 0 elsewhere. Summed over the world it
        is ``num_microbatches * dp_size * cp_size`` times the global-batch mean
        (:meth:`mean_of`)."""
        total = torch.zeros(1, dtype=torch.float64, device=device)
        if reported and ps.tp_rank == 0:
            total += torch.stack([l.double() for l in reported]).sum()
        return total

    def mean_of(self, world_sum: float, ps: ParallelState) -> float:
        """The global-batch mean loss from the world sum of :meth:`local_sum` (every CP rank
        reports the mean of its share of each microbatch's tokens)."""
        return world_sum / (self.num_microbatches * ps.dp_size * ps.cp_size)

    def global_mean(self, reported: list[Tensor], ps: ParallelState,
                    device: torch.device) -> float:
        """Mean over all microbatches of all DP ranks of the values ``reported`` by this step's
        schedule (non-empty on the last pipeline stage only); every rank gets it. One
        all-reduce over the world (only the last stage's tp_rank 0 ranks contribute) and one
        host sync; ``device``: where this rank's collectives run. With context parallelism
        each CP rank reports the mean over its equal share of the tokens, so their mean is
        the microbatch's (each token counted once). (The training loop sums
        :meth:`local_sum` in one collective with its stop votes instead.)"""
        total = self.local_sum(reported, ps, device)
        if ps.world_size > 1:
            dist.all_reduce(total)
        return self.mean_of(float(total.item()), ps)


def masked_token_mean(per_token: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean of ``per_token`` [b, s] over the positions where ``loss_mask`` [b, s] is 1 (fp32)."""
    mask = loss_mask.float()
    # a BERT or T5 sample always has a token to predict; the clamp only keeps an empty mask
    # finite
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass(frozen=True)
class BERTLoss(GPTLoss):
    """BERT pretraining loss (masked LM + sentence order) of one step; reported and averaged
    over microbatches and data-parallel ranks as :class:`GPTLoss`."""

    def __call__(self, output: tuple[Tensor, Tensor | None],
                 microbatch: dict) -> tuple[Tensor, Tensor]:
        """``output``: (per-token masked-LM loss [b, s], binary-head logits [b, 2] or None);
        ``microbatch``: its ``loss_mask`` [b, s] (1 at masked tokens) and ``is_random`` [b]
        (the sentence-order label). -> (loss * loss_scale / num_microbatches, the loss
        detached); the loss is the masked-token mean (+ the sentence-order cross-entropy)."""
        per_token, binary = output
        loss = masked_token_mean(per_token, microbatch["loss_mask"])
        if binary is not None:
            loss = loss + F.cross_entropy(binary.float(), microbatch["is_random"].view(-1),
                                          ignore_index=-1)
        return loss * (self.loss_scale / self.num_microbatches), loss.detach()


@dataclass(frozen=True)
class T5Loss(GPTLoss):
    """T5 pretraining loss of one step: per microbatch the mean cross-entropy over the decoder
    tokens (``loss_mask``), Megatron-LM's ``pretrain_t5.py`` loss; reported and averaged over
    microbatches and data-parallel ranks as :class:`GPTLoss`."""

    def __call__(self, per_token: Tensor, microbatch: dict) -> tuple[Tensor, Tensor]:
        """``per_token``: the decoder's per-token loss [b, s]; ``microbatch``: its
        ``loss_mask`` [b, s] (1 at the target tokens, 0 at padding) -> (loss * loss_scale /
        num_microbatches, the loss detached)."""
        loss = masked_token_mean(per_token, microbatch["loss_mask"])
        return loss * (self.loss_scale / self.num_microbatches), loss.detach()
