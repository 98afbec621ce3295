"""The optimizer interface: what the trainer, the pipeline schedule and checkpoints use.

Two implementations, picked by :func:`megalite.optim.build.build_optimizer`:

* :class:`megalite.optim.optimizer.Optimizer`: megalite's AdamW, state replicated over the
  data-parallel ranks (``zero_stage == 0``);
* :class:`megalite.optim.zero.ZeroOptimizer`: DeepSpeed ZeRO, state partitioned over the
  data-parallel ranks (``zero_stage`` 1, 2 or 3).

Both take the same parameter groups (:func:`param_groups`), return a :class:`StepResult` from
``step`` and declare their kind in ``zero_stage``, which checkpoint code reads instead of
guessing from attributes. One step, in the order the trainer calls it::

    schedule: optimizer.backward(output, grad) per microbatch   (gradients accumulate)
    optimizer.finish_grad_sync()    the full-batch gradient (megalite.parallel.grad_sync)
    optimizer.step(lr) -> StepResult
    optimizer.zero_grad()
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass

from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError

__all__ = ["StepResult", "TrainingOptimizer", "param_groups", "unique_parameters",
           "attach_main_grads"]


@dataclass
class StepResult:
    """What one optimizer step did (the same values on every rank). ``grad_norm`` and
    ``skipped`` may be 0-dim tensors still on the device, so that a step needs no host sync;
    :meth:`host` reads them back."""

    grad_norm: float | Tensor
    """Global L2 norm of the unscaled gradient before clipping (inf/nan when it overflowed)."""
    skipped: bool | Tensor
    """True (or 1.0) when the step was skipped because a gradient was inf/nan somewhere."""
    loss_scale: float
    """Loss scale used for this step's backward (1.0 unless fp16)."""

    def host(self) -> "StepResult":
        """The same result with Python numbers (a host sync when they are on a device)."""
        return StepResult(grad_norm=float(self.grad_norm), skipped=bool(self.skipped),
                          loss_scale=float(self.loss_scale))


def unique_parameters(model_chunks) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter of the chunks, each once, in order."""
    seen, out = set(), []
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    return out


def _no_decay(name: str, p: Tensor) -> bool:
    # Biases and norm weights (all 1-D) are not decayed: shrinking them toward zero changes the
    # function without regularizing any weight matrix.
    return p.dim() < 2 or name.endswith(".bias")


def param_groups(model_chunks, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices with ``weight_decay``, biases and norms (1-D) without.

    Empty groups are left out. Each group also carries ``"names"`` (for error messages and
    checkpoint manifests; torch's optimizers keep extra keys untouched).
    """
    decay: list = []
    plain: list = []
    for name, p in unique_parameters(model_chunks):
        (plain if _no_decay(name, p) else decay).append((name, p))
    groups = []
    for members, wd in ((decay, weight_decay), (plain, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "weight_decay": wd,
                           "names": [n for n, _ in members]})
    if not groups:
        raise MegaliteError("the model has no trainable parameters")
    return groups


def _accumulate_main_grad(p: Tensor) -> None:
    # Post-accumulate-grad hook (half modes): fold this microbatch's half-precision gradient
    # into the fp32 accumulator and drop it, so half gradients never sum with each other.
    p.main_grad.add_(p.grad)
    p.grad = None


def attach_main_grads(params: list[nn.Parameter], buffers: list[Tensor]) -> list:
    """Give ``params[i]`` the fp32 accumulator ``main_grad = buffers[i]`` (same shape) and a
    hook that adds each microbatch's half-precision ``.grad`` into it; returns the hooks."""
    hooks = []
    for p, buf in zip(params, buffers, strict=True):
        p.main_grad = buf
        hooks.append(p.register_post_accumulate_grad_hook(_accumulate_main_grad))
    return hooks


class TrainingOptimizer(abc.ABC):
    """What every megalite optimizer provides (see the module docstring for the step order).

    Args:
        model_chunks: this rank's model chunks (one per virtual pipeline stage).
        optim: ``OptimConfig``; precision: ``PrecisionConfig``; ps: this rank's layout.

    Attributes set here: ``groups`` (:func:`param_groups` of the chunks), ``params`` and
    ``param_names`` (the groups' parameters and names, flattened in order).
    """

    zero_stage: int = 0
    """The declared kind: 0 for state replicated over data-parallel ranks, 1-3 for ZeRO."""

    def __init__(self, model_chunks, optim, precision, ps: ParallelState):
        self.model_chunks, self.optim, self.precision, self.ps = model_chunks, optim, precision, ps
        self.groups = param_groups(model_chunks, optim.weight_decay)
        self.params: list[nn.Parameter] = [p for g in self.groups for p in g["params"]]
        self.param_names: list[str] = [n for g in self.groups for n in g["names"]]

    @property
    @abc.abstractmethod
    def loss_scale(self) -> float:
        """Factor the loss of each microbatch is multiplied by before backward (1.0 unless
        fp16; read once per step by the trainer)."""

    @abc.abstractmethod
    def backward(self, output: Tensor, grad: Tensor | None) -> None:
        """The schedule's ``backward_fn``: the scaled scalar loss with ``grad=None`` on the
        last stage, or an activation and the gradient received from the next stage."""

    @abc.abstractmethod
    def finish_grad_sync(self) -> None:
        """After the last microbatch: make the accumulated gradients the full-batch ones."""

    @abc.abstractmethod
    def step(self, lr: float) -> StepResult:
        """Unscale, global norm (skip on inf/nan on every rank), clip, update at ``lr``."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Clear the gradients before the next step."""

    @abc.abstractmethod
    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank beyond the model."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """This rank's state as plain data (``torch.load(weights_only=True)`` reads it)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output saved under the same layout."""

    def before_last_backward(self, chunk: int) -> None:
        """The schedule's call just before model chunk ``chunk``'s last backward of the step
        (overlapped gradient reduction starts there); nothing by default."""

    def gathered_parameters(self):
        """Context inside which every model parameter holds its full tensor: a no-op unless
        the parameters are partitioned (ZeRO-3)."""
        return contextlib.nullcontext()
