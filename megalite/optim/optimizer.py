"""megalite's optimizer: AdamW on fp32 master weights, gradient sync, clipping, loss scaling.

One step, in the order the trainer calls it (the interface: :mod:`megalite.optim.base`)::

    schedule: optimizer.backward(output, grad) per microbatch   (grads accumulate, see below)
    optimizer.finish_grad_sync()    sequence-parallel sum over tp, tied-embedding sum over the
                                    first/last stage, average over data-parallel replicas
                                    (:func:`megalite.parallel.grad_sync.sync_model_grads`)
    optimizer.step(lr)              unscale (fp16), global norm over all ranks, skip on inf/nan,
                                    clip, AdamW, copy the fp32 masters back into the model
    optimizer.zero_grad()

Precision modes (``PrecisionConfig``):

* fp32 (default): no master copy; AdamW updates the model parameters in place and gradients
  accumulate in ``param.grad`` (fp32) across microbatches.
* bf16 / fp16: the model parameters are held in half precision (cast here if they are not). An
  fp32 master copy of every parameter lives in the optimizer; every parameter gets an fp32
  ``main_grad`` (views into one flat buffer) and a post-accumulate-grad hook that adds the half
  ``.grad`` of each microbatch into it and frees the half gradient, so accumulation across
  microbatches (and the data-parallel reduction) runs in fp32. fp16 also scales the loss
  (:mod:`megalite.optim.loss_scaler`).

Who holds what: every rank holds optimizer state for exactly its own parameter shards (its tp
shard of its pipeline stage's layers); data-parallel replicas hold identical copies (for
sharding over data-parallel ranks use :mod:`megalite.optim.zero`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.optim.base import StepResult, TrainingOptimizer, attach_main_grads
from megalite.optim.grad_clip import clip_by_global_norm, grad_norm_tensor
from megalite.optim.loss_scaler import build_loss_scaler
from megalite.parallel.grad_buckets import GradBuckets
from megalite.parallel.grad_sync import sync_model_grads

__all__ = ["Optimizer"]


class Optimizer(TrainingOptimizer):
    """AdamW + fp32 master weights + gradient sync + global-norm clipping + loss scaling
    (``zero_stage`` 0: the state is replicated over the data-parallel ranks).

    Args:
        model_chunks: this rank's model chunks (one per virtual pipeline stage).
        optim: ``OptimConfig`` (lr is passed to :meth:`step`; betas, eps, weight decay,
            clip_grad from here).
        precision: ``PrecisionConfig`` (bf16 / fp16 / fp32 and the loss-scale settings).
        ps: this rank's layout; collectives run over its tp, pp (embedding), dp and mp groups.
    """

    def __init__(self, model_chunks, optim, precision, ps: ParallelState, *,
                 overlap_grad_reduce: bool = False):
        if precision.bf16 and precision.fp16:
            raise MegaliteError("--bf16 and --fp16 are mutually exclusive")
        super().__init__(model_chunks, optim, precision, ps)
        self.half = precision.bf16 or precision.fp16
        self.dtype = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 \
            else torch.float32
        self.scaler = build_loss_scaler(precision)
        self._hooks = []
        # dp > 1: the gradients live in the data-parallel buckets' flat fp32 buffer
        # (parallel/grad_buckets.py), each bucket reduced in place, overlapped with backward
        # under --overlap-grad-reduce
        self.grad_buckets = GradBuckets(model_chunks, self.params, ps,
                                        overlap=overlap_grad_reduce) if ps.dp_size > 1 else None
        if self.half:
            # Masters from the values as they are now (fp32 init keeps its full precision),
            # then the model goes to half precision.
            self.masters = [nn.Parameter(p.detach().to(torch.float32).clone())
                            for p in self.params]
            for p in self.params:
                if p.dtype != self.dtype:
                    p.data = p.data.to(self.dtype)
            if self.grad_buckets is not None:
                self._grad_buffer = self.grad_buckets.buffer
                views = self.grad_buckets.views()
            else:
                self._grad_buffer = torch.zeros(sum(p.numel() for p in self.params),
                                                dtype=torch.float32, device=self.params[0].device)
                views, offset = [], 0
                for p in self.params:
                    views.append(self._grad_buffer[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            self._hooks = attach_main_grads(self.params, views)
            for m, view in zip(self.masters, views):
                m.grad = view                  # the master's gradient IS the fp32 accumulator
            opt_params = self.masters
        else:
            for p in self.params:
                if p.dtype != torch.float32:
                    raise MegaliteError(f"fp32 training needs float32 parameters, got {p.dtype}; "
                                        f"pass --bf16/--fp16 for half precision")
            opt_params = self.params
        if self.grad_buckets is not None:
            self.grad_buckets.install_hooks()   # after the main_grad folds (hook order)
            self._grads()                       # fp32: the .grad views from the start
        groups, i = [], 0
        for g in self.groups:
            n = len(g["params"])
            groups.append({"params": opt_params[i:i + n], "weight_decay": g["weight_decay"],
                           "names": g["names"]})
            i += n
        # torch's fused kernel (CPU and CUDA): one pass over each tensor instead of one per
        # elementwise op (9.5x faster than the default per-tensor loop on this CPU,
        # BENCHMARKS.md), and it takes the overflow flag on the device (found_inf), so a
        # skipped step needs no host sync.
        self.adamw = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1,
                                       optim.adam_beta2), eps=optim.adam_eps,
                                       weight_decay=optim.weight_decay, fused=True)

    # -- the trainer's interface -----------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        """Factor the schedule multiplies each microbatch loss by (1.0 unless fp16)."""
        return self.scaler.scale

    def backward(self, output: Tensor, grad: Tensor | None) -> None:
        """The schedule's ``backward_fn``: scalar (already scaled) loss with ``grad=None`` on
        the last stage, or an activation and the gradient received from the next stage."""
        torch.autograd.backward(output, grad_tensors=grad)

    def before_last_backward(self, chunk: int) -> None:
        """The schedule's call before ``chunk``'s last backward of the step: from then on
        its gradient buckets may start reducing (``--overlap-grad-reduce``)."""
        if self.grad_buckets is not None:
            self.grad_buckets.arm(chunk)

    def _grads(self) -> list[Tensor]:
        """This rank's gradient of each parameter (fp32); missing ones become zeros."""
        if self.half:
            return [p.main_grad for p in self.params]
        if self.grad_buckets is not None:
            # fp32 with dp > 1: each .grad is its view into the bucket buffer (zero_grad sets
            # them; autograd accumulates into them in place: 0 + g is exact)
            for p, view in zip(self.params, self.grad_buckets.views()):
                if p.grad is None:
                    p.grad = view
            return [p.grad for p in self.params]
        for p in self.params:
            if p.grad is None:   # e.g. a layer no microbatch reached: contribute zero
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def finish_grad_sync(self) -> None:
        """After the last microbatch: SP sum over tp, tied-embedding sum, DP average."""
        sync_model_grads(self.model_chunks, self.params, self._grads(), self.ps,
                         grad_attr="main_grad" if self.half else "grad",
                         buckets=self.grad_buckets)

    @torch.no_grad()
    def step(self, lr: float) -> StepResult:
        """Unscale (fp16), global norm, clip, AdamW at ``lr``; skipped everywhere on inf/nan.

        An inf/nan in any rank's gradient reaches every rank's norm without a collective of
        its own: ``finish_grad_sync``'s data-parallel average spreads it over the replicas and
        the norm's sum over tp x pp over the rest, so all ranks skip together.

        bf16 / fp32: no host sync. The norm, the clip factor and the overflow flag stay on the
        device and the fused AdamW kernel skips its update (and its step count) when the flag
        is set; the result holds them as tensors (:meth:`StepResult.host` reads them).
        fp16: the loss scaler decides on the host, so the overflow flag is read here (as
        Megatron-LM's fp16 optimizer does).
        """
        grads = self._grads()
        scale = self.scaler.scale
        if scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / scale)
        norm = grad_norm_tensor(self.params, grads, self.ps)
        found_inf = norm.isfinite().logical_not().float()
        skipped: bool | torch.Tensor = found_inf
        if self.precision.fp16:
            skipped = bool(found_inf)
            self.scaler.update(skipped)
            if skipped:
                return StepResult(grad_norm=norm, skipped=True, loss_scale=scale)
        clip_by_global_norm(grads, norm, self.optim.clip_grad)
        for group in self.adamw.param_groups:
            group["lr"] = lr
        self.adamw.found_inf = found_inf
        self.adamw.step()
        if self.half:
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
        return StepResult(grad_norm=norm, skipped=skipped, loss_scale=scale)

    def zero_grad(self) -> None:
        """Clear the gradients (fp32 accumulators are zeroed in place, not reallocated)."""
        if self.half:
            self._grad_buffer.zero_()
        for p in self.params:
            p.grad = None
        if self.grad_buckets is not None:
            self.grad_buckets.reset()
            if not self.half:
                self.grad_buckets.buffer.zero_()
                self._grads()       # the .grad views, before the next backward

    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimizer beyond the model: AdamW moments (+ fp32 masters in
        bf16/fp16). The same on every data-parallel rank (no sharding; see ZeRO)."""
        total = sum(m.numel() * m.element_size() for m in self.masters) if self.half else 0
        for state in self.adamw.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values()
                         if torch.is_tensor(t) and t.dim() > 0)
        return total

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bitwise-exact resume needs: AdamW moments and step counts, the fp32
        master weights (half modes) and the loss-scaler state. Tensors are this rank's."""
        return {"adamw": self.adamw.state_dict(),
                "masters": [m.detach().clone() for m in self.masters] if self.half else None,
                "scaler": self.scaler.state_dict(),
                "param_names": list(self.param_names)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (same layout); the masters are copied into the
        model parameters too, so the model equals the saved run's model."""
        if state.get("param_names") != self.param_names:
            raise MegaliteError("optimizer state does not match the model's parameters "
                                "(different model or parallel layout)")
        if (state["masters"] is not None) != self.half:
            raise MegaliteError("optimizer state was saved with a different precision "
                                "(bf16/fp16 keep fp32 master weights, fp32 does not)")
        self.adamw.load_state_dict(state["adamw"])
        for group in self.adamw.param_groups:   # a checkpoint from before the fused kernel
            group["fused"], group["foreach"] = True, None
        if self.half:
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                m.copy_(saved)
                p.copy_(m)
        self.scaler.load_state_dict(state["scaler"])

