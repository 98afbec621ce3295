"""ZeRO optimizer sharding over the data-parallel group, backed by DeepSpeed.

``--zero-stage 1`` shards the AdamW state and fp32 master weights over the data-parallel ranks,
``2`` also the reduced gradients, ``3`` also the parameters themselves. Optimizer-state memory per
rank falls as 1/DP. megalite's layout goes to DeepSpeed as an ``mpu`` (:class:`DeepSpeedMpu`) so
it shards only over ``ps.dp_group`` and sums the gradient norm over the tp x pp group (the mpu,
the start-up checks and the DeepSpeed config live in :mod:`megalite.optim.deepspeed_setup`).

Supported (checked by :func:`validate_zero` before anything is built):

=====  ========================  ==========================================================
stage  layouts                   how megalite drives it
=====  ========================  ==========================================================
1      any TP, any PP            shadow parameters (below); fp32, bf16 or fp16
2      any TP, no PP             shadow parameters; fp32, bf16 or fp16
3      no TP, no PP              DeepSpeed wraps the model; engine.backward per microbatch;
                                 fp32, bf16 or fp16 (gradients accumulated and reduced in fp32)
=====  ========================  ==========================================================

Expert parallelism (``--expert-model-parallel-size`` > 1) with stages 1 and 2: the expert
shadows go to DeepSpeed's MoE path, partitioned and reduced over megalite's expert-data-parallel
group (:mod:`megalite.optim.zero_experts`); stage 3 with expert parallelism is refused.

fp16: DeepSpeed's dynamic loss scaler owns the scale (set from megalite's flags; megalite's
rule but for the timing of the first doubling, see ``deepspeed_setup._fp16_section``). Stages
1/2: the schedule multiplies the loss by that scale (:attr:`ZeroOptimizer.loss_scale`), so the
model's gradients arrive scaled; the surrogate below is divided by the scale (in fp32: exact for
powers of two) because DeepSpeed's backward multiplies it again, and DeepSpeed's step finds
overflows, skips, unscales and updates the scale. Stage 3: ``engine.backward`` scales the loss.

Stages 1 and 2, the *shadow* design. The pipeline schedule backpropagates activations between
stages (``backward_fn(output, grad)``) and megalite must sum sequence-parallel gradients over
tp and tied-embedding gradients over the first/last stage before the data-parallel reduction.
DeepSpeed's gradient hooks sit on the parameters it was given and reduce/partition gradients as
soon as they appear, which cannot be interleaved with those sums. So DeepSpeed is given
*shadow* parameters: separate ``nn.Parameter`` objects whose storage the model's parameters
alias (``model_param.data = shadow.data``; no copy). The schedule's backward accumulates
gradients on the model's parameters with plain autograd (no DeepSpeed hook fires);
``finish_grad_sync`` does the tp / embedding sums and then runs *one* DeepSpeed backward of the
surrogate ``sum_i <shadow_i, g_i>`` whose gradient is exactly ``g_i`` (a product with 1 per
element: bitwise), so DeepSpeed reduce-scatters (averages) the full-batch gradient over the
data-parallel group once per step. ``step`` is DeepSpeed's: norm over dp and tp x pp (replicated
parameters counted on tp rank 0; the last stage's tied-embedding copy is marked
``ds_pipe_replicated`` so it is not counted twice), clipping, AdamW on the fp32 partition,
all-gather of the updated weights into the (aliased) parameters.

Stage 3 (no TP, no PP, so no such sums): DeepSpeed partitions the model's own parameters and
gathers them in forward hooks; each microbatch's backward is ``engine.backward(loss,
scale_wrt_gas=False)`` in DeepSpeed's "unmanaged" accumulation mode (gradients accumulate,
``step`` is the boundary), so DeepSpeed never divides the loss by its accumulation count: the
schedule already divides by the number of microbatches.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.optim.deepspeed_setup import (allow_fp16_on_cpu, DeepSpeedMpu, deepspeed_config,
                                            validate_zero, without_shm_inference_op)
from megalite.optim.base import StepResult, TrainingOptimizer, attach_main_grads
from megalite.optim.zero_experts import (expert_marker, refuse_unsupported,
                                         register_expert_groups, split_expert_groups)
from megalite.optim.zero_state import ParamStateLoader, portable_index
from megalite.parallel.grad_sync import sync_model_grads

__all__ = ["DeepSpeedMpu", "validate_zero", "deepspeed_config", "ZeroOptimizer"]


def _plain_groups(groups: list[dict]) -> list[dict]:
    # DeepSpeed builds its flat partitions per group from "params"; keep only torch's keys.
    return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]


class ZeroOptimizer(TrainingOptimizer):
    """The :class:`~megalite.optim.base.TrainingOptimizer` interface backed by DeepSpeed ZeRO
    (``zero_stage`` 1, 2 or 3: state partitioned over the data-parallel ranks).

    Args:
        model_chunks, optim, precision, ps: as for ``Optimizer``.
        zero_stage: 1, 2 or 3 (0 only if ``user_config`` sets the stage).
        user_config: path of the user's DeepSpeed JSON (``--deepspeed-config``) or a dict.
        micro_batch_size, global_batch_size: for checking the user's batch keys.
    """

    def __init__(self, model_chunks, optim, precision, ps: ParallelState, zero_stage: int, *,
                 user_config: str | dict | None = None, micro_batch_size: int | None = None,
                 global_batch_size: int | None = None):
        stage, config = deepspeed_config(zero_stage, optim, precision, ps, user_config,
                                         micro_batch_size=micro_batch_size,
                                         global_batch_size=global_batch_size)
        validate_zero(stage, ps, precision)
        ep_size = getattr(ps, "ep_size", 1)
        refuse_unsupported(stage, ep_size, config["zero_optimization"])
        if stage == 0:
            raise MegaliteError("ZeroOptimizer needs --zero-stage 1, 2 or 3")
        import deepspeed  # heavy import, only when ZeRO is used

        # DeepSpeed 0.19.8 still calls torch.distributed's deprecated *_tensor collectives;
        # the FutureWarning on every rank is noise for megalite's users, not something they
        # can act on.
        warnings.filterwarnings(
            "ignore", category=FutureWarning,
            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                    r"deprecated")

        super().__init__(model_chunks, optim, precision, ps)
        self.zero_stage = stage
        self.config = config
        # stages 1/2 keep megalite's fp32 main_grad accumulation (shadow design); stage 3
        # leaves gradients to DeepSpeed (fp32 accumulation configured above)
        self.half = bool(precision.bf16 or precision.fp16) and stage != 3
        self.fp16 = bool(precision.fp16)
        self.dtype = precision.params_dtype
        groups = self.groups
        for p in self.params:
            if p.dtype != self.dtype:
                p.data = p.data.to(self.dtype)
        if self.zero_stage == 3:
            if len(model_chunks) != 1:
                raise MegaliteError("--zero-stage 3 needs a single model chunk (no pipelining)")
            module = model_chunks[0]
            opt_groups = _plain_groups(groups)
            self.shadows = None
        else:
            self.shadows = [nn.Parameter(p.detach()) for p in self.params]   # same storage
            for p, s in zip(self.params, self.shadows):
                # Megatron's attribute names, which DeepSpeed's norm reads.
                s.tensor_model_parallel = getattr(p, "tensor_parallel_dim", None) is not None
                if getattr(p, "shared_embedding", False):
                    s.ds_pipe_replicated = True
            shadow_of = {id(p): s for p, s in zip(self.params, self.shadows)}
            opt_groups = [{"params": [shadow_of[id(p)] for p in g["params"]],
                           "weight_decay": g["weight_decay"]} for g in groups]
            marker = None
            if ep_size > 1:    # expert shadows go to DeepSpeed's MoE path (zero_experts)
                experts = {id(s) for p, s in zip(self.params, self.shadows)
                           if getattr(p, "is_expert", False)}
                opt_groups = split_expert_groups(opt_groups, experts, register_expert_groups(ps))
                marker = expert_marker(len(experts))
            module = _ShadowModule(self.shadows, marker)
            if self.half:
                self._grad_buffers = [torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                                      for p in self.params]
                attach_main_grads(self.params, self._grad_buffers)
        adamw = torch.optim.AdamW(opt_groups, lr=optim.lr, betas=(optim.adam_beta1,
                                  optim.adam_beta2), eps=optim.adam_eps,
                                  weight_decay=optim.weight_decay)
        if self.precision.fp16:
            allow_fp16_on_cpu(deepspeed)
        with without_shm_inference_op(deepspeed):
            self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
                model=module, optimizer=adamw, config=config, mpu=DeepSpeedMpu(ps))
        self._realias()
        if self.zero_stage == 3:
            _route_forward_through_engine(model_chunks[0], self.engine)

    # -- plumbing --------------------------------------------------------------------------
    def _realias(self) -> None:
        """Point every model parameter at its shadow's (DeepSpeed-owned) storage."""
        if self.shadows is None:
            return
        for p, s in zip(self.params, self.shadows):
            if p.data_ptr() != s.data_ptr() or p.shape != s.shape:
                p.data = s.data

    # -- the trainer's interface -----------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        """What the schedule multiplies the loss by: DeepSpeed's current fp16 scale with stages
        1/2, else 1.0 (bf16/fp32 need none; stage 3 scales inside ``engine.backward``)."""
        return self._ds_scale() if self.fp16 and self.zero_stage != 3 else 1.0

    def _ds_scale(self) -> float:
        return float(self.ds_optimizer.loss_scale) if self.fp16 else 1.0

    def backward(self, output: Tensor, grad: Tensor | None) -> None:
        """The schedule's ``backward_fn`` (see the module docstring for each stage)."""
        if self.zero_stage == 3:
            if grad is not None:
                raise MegaliteError("ZeRO-3 backward expects the scalar loss (no pipelining)")
            self.engine.backward(output, scale_wrt_gas=False)
        else:
            torch.autograd.backward(output, grad_tensors=grad)

    def finish_grad_sync(self) -> None:
        """Stages 1/2: tp / embedding sums, then one DeepSpeed backward that reduce-scatters
        the averaged gradient over the data-parallel group. Stage 3: nothing (reduced in
        every ``backward``)."""
        if self.zero_stage == 3:
            return
        if self.half:
            grads = self._grad_buffers
        else:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            for p, g in zip(self.params, grads):
                p.grad = g
        sync_model_grads(self.model_chunks, self.params, grads, self.ps,
                         grad_attr="main_grad" if self.half else "grad", data_parallel=False)
        for p in self.params:
            p.grad = None
        # d/ds sum(s * g) = g exactly; bf16 shadows receive the fp32 sum rounded once.
        if self.fp16:
            # in fp32 (a scaled fp16 product could overflow, 1/scale could underflow);
            # DeepSpeed multiplies by the scale again: the gradient reaching s is g, rounded
            # once to fp16 (inf if the scaled gradient overflowed, which its step then skips)
            # (fp16 shadow x fp32 gradient buffer: the product is fp32)
            surrogate = sum((s * g).sum() for s, g in zip(self.shadows, grads))
            surrogate = surrogate / self._ds_scale()
        else:
            surrogate = sum((s * g.to(s.dtype)).sum() for s, g in zip(self.shadows, grads))
        self.engine.backward(surrogate, scale_wrt_gas=False)
        if self.half:
            for buf in self._grad_buffers:
                buf.zero_()

    @torch.no_grad()
    def step(self, lr: float) -> StepResult:
        """DeepSpeed's step at ``lr``: global norm, clip, AdamW on this rank's partition,
        all-gather of the new weights. A non-finite norm skips the step (every rank)."""
        for group in self.ds_optimizer.param_groups:
            group["lr"] = lr
        scale = self._ds_scale()     # the scale this step's gradients carry
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = not self.engine.was_step_applied()
        self._realias()
        return StepResult(grad_norm=norm, skipped=skipped, loss_scale=scale)

    def zero_grad(self) -> None:
        """Clear gradients (DeepSpeed clears its own partitions in ``step``)."""
        for p in self.params:
            p.grad = None
        if self.zero_stage != 3:
            for s in self.shadows:
                s.grad = None

    def gathered_parameters(self):
        """Context manager inside which every model parameter holds its full tensor (ZeRO-3
        partitions them between forwards: read or save weights only inside it; collective
        over the dp group). A no-op for stages 1 and 2."""
        if self.zero_stage != 3:
            return super().gathered_parameters()
        import deepspeed
        return deepspeed.zero.GatheredParameters(self.params)

    # -- checkpoints and introspection -----------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shard as plain data (tensors, numbers, strings, containers; what
        ``torch.load(weights_only=True)`` reads back): DeepSpeed's ZeRO optimizer state (fp32
        partition, AdamW moments and step), the parameter names for a layout check, and the
        fragment map (:func:`~megalite.optim.zero_state.portable_index`) that lets the state
        be reassembled by parameter name under another layout or stage.

        DeepSpeed's own objects are dropped or made plain: its loss scaler (the numbers of its
        state; the live object gets them back on load), the stage enum (an int) and the slice
        mappings (only used by DeepSpeed's universal checkpoints)."""
        ds = dict(_snapshot(self.ds_optimizer.state_dict()))
        ds.pop("param_slice_mappings", None)
        if "loss_scaler" in ds:
            ds["loss_scaler"] = _scaler_state(ds["loss_scaler"])
        if "zero_stage" in ds:
            ds["zero_stage"] = int(ds["zero_stage"])
        return {"zero_stage": self.zero_stage, "deepspeed": ds, "param_names": self.param_names,
                "portable": portable_index(self)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (same layout and stage; collective over the dp group).
        The fp32 partitions come back exactly and the model weights are rebuilt from them.
        State of another layout or stage goes through :meth:`param_state_loader`."""
        self.check_state_dict(state)
        # DeepSpeed indexes the list by data-parallel rank (it was made for loading every
        # rank's file); a same-layout resume only needs this rank's own shard.
        from deepspeed.runtime.zero.config import ZeroStageEnum
        ds = dict(state["deepspeed"])
        scaler_state = ds.get("loss_scaler")
        if "loss_scaler" in ds:
            ds["loss_scaler"] = self.ds_optimizer.loss_scaler
        if "zero_stage" in ds:
            ds["zero_stage"] = ZeroStageEnum(ds["zero_stage"])
        shards = [None] * self.ps.dp_size
        shards[self.ps.dp_rank] = ds
        self.ds_optimizer.load_state_dict(shards, load_from_fp32_weights=True)
        if self.zero_stage != 3:
            self.ds_optimizer.update_lp_params()   # fp32 partitions -> (aliased) model weights
        if isinstance(scaler_state, dict):
            for key, value in scaler_state.items():
                setattr(self.ds_optimizer.loss_scaler, key, value)
        self._realias()

    def check_state_dict(self, state: dict) -> None:
        """MegaliteError unless ``state`` is this run's kind of state (same stage, parameters
        and layout); not collective, so a loader can check every rank before loading."""
        if (state.get("zero_stage") != self.zero_stage
                or state.get("param_names") != self.param_names):
            raise MegaliteError("ZeRO optimizer state does not match this run (different "
                                "--zero-stage, model or parallel layout)")

    def param_state_loader(self) -> ParamStateLoader:
        """A :class:`~megalite.optim.zero_state.ParamStateLoader`: how state saved under another
        layout or ZeRO stage arrives (per parameter name, this rank's tensor-parallel shard;
        :mod:`megalite.checkpoint.reshard_optim`)."""
        return ParamStateLoader(self)

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank: AdamW moments and fp32 master
        partitions (what ZeRO shards over data-parallel ranks)."""
        ds = self.ds_optimizer
        masters = (getattr(ds, "single_partition_of_fp32_groups", None)      # stages 1, 2
                   or getattr(ds, "fp32_partitioned_groups_flat", None) or [])  # stage 3
        total = sum(t.numel() * t.element_size() for t in masters)
        for state in ds.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values()
                         if torch.is_tensor(t) and t.dim() > 0)
        return total


_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _scaler_state(scaler) -> dict:
    """The numbers of DeepSpeed's (static or dynamic) loss scaler that change while training."""
    return {k: (float(v) if k == "cur_scale" else int(v))
            for k in _SCALER_FIELDS if (v := getattr(scaler, k, None)) is not None}


def _snapshot(obj):
    """``obj`` with every tensor copied to host memory (DeepSpeed's state dict holds its live
    buffers, some of them non-leaf views that ``copy.deepcopy`` refuses; a device copy would
    double the optimizer's memory on the accelerator while saving)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _route_forward_through_engine(model: nn.Module, engine) -> None:
    """Make ``model(...)`` run as ``engine(...)`` (ZeRO-3).

    DeepSpeed's engine forward arms the per-backward bookkeeping of its ZeRO-3 optimizer (hooks
    on the output that run its backward prologue); calling the wrapped module directly leaves
    it unarmed and, with two microbatches per step, silently gives a wrong gradient (measured:
    a 28% smaller gradient norm at step 1 than the DP=1 reference). The schedule calls the model
    chunk itself, so the chunk's ``forward`` is replaced by one that enters the engine once;
    the engine then calls the module again, which runs the original forward.
    """
    original = model.forward
    inside = [False]

    def forward(*args, **kwargs):
        if inside[0]:
            return original(*args, **kwargs)
        inside[0] = True
        try:
            return engine(*args, **kwargs)
        finally:
            inside[0] = False

    model.forward = forward


class _ShadowModule(nn.Module):
    """Holds the shadow parameters so DeepSpeed can wrap them; never called forward."""

    def __init__(self, shadows: list[nn.Parameter], expert_marker: nn.Module | None = None):
        super().__init__()
        self.shadows = nn.ParameterList(shadows)
        if expert_marker is not None:
            self.expert_groups = expert_marker

    def forward(self, *args, **kwargs):  # pragma: no cover - DeepSpeed only needs parameters
        raise MegaliteError("the ZeRO shadow module is not a model")
