"""The mixture-of-experts layer: replaces the MLP of the layers ``--moe-layer-freq`` selects.

``MoELayer.forward(x [s, b, h]) -> [s, b, h]`` (with SP: ``[s/tp, b, h]`` in and out)::

    routing = route(router(x))                   # megalite.model.router: fp32, top-k, losses
    rows, counts = dispatcher.dispatch(x, routing.probs, routing.expert_ids)
    y = dispatcher.combine(experts(rows, counts)) (+ shared_experts(x), gated or not)

Parameters (full-model names; ``<i>`` the global layer id, ``<e>`` the *global* expert id)::

    layers.<i>.mlp.router.weight                        [E, h]        replicated
    layers.<i>.mlp.experts.<e>.linear_fc1.weight        [f' or 2f', h] column-parallel (tp dim 0;
                                                                      [gate; up], stride 2, gated)
    layers.<i>.mlp.experts.<e>.linear_fc2.weight        [h, f']       row-parallel (tp dim 1)
    layers.<i>.mlp.shared_experts.linear_fc1.weight     as the dense MLP's, width
    layers.<i>.mlp.shared_experts.linear_fc2.weight       --moe-shared-expert-intermediate-size
    layers.<i>.mlp.shared_experts.gate_weight           [1, h]        replicated (optional)

``f'`` is ``--moe-ffn-hidden-size``. One tensor per expert (not a grouped ``[E, ...]``
tensor): a rank holds the experts ``ep_rank * E_local + j`` (``j < E_local = E / ep_size``)
under their global names, so checkpoints, resharding across expert-parallel sizes and the
Hugging Face maps work by name. Expert parameters carry ``is_expert = True`` and
``allreduce = False`` (their gradients are reduced over the expert-data-parallel group, not
the full data-parallel group). Experts have no biases (``--disable-bias-linear`` is required).

Tensor parallelism (as the dense MLP): every tp rank sees all tokens (SP: the sequence is
all-gathered first), computes its ``f'/tp`` slice of every expert, and the partial sums are
all-reduced (SP: reduce-scattered) once, after the combine. The router runs on the replicated
tokens (SP: each rank's sequence slice, the logits all-gathered; the router weight's gradient
is then partial and marked ``sequence_parallel``); the routing weights enter the tp region
through an identity whose backward sums their partial gradients over tp, so routing and its
gradients are the single process's on every tp rank.

Expert compute is grouped: one ``torch._grouped_mm`` per linear over all local experts when
this torch has it for the dtype and shapes (fp32/bf16/fp16, rows 16-byte aligned), else a
loop over the experts (``Experts.grouped = False`` forces the loop; benchmarks/moe_layer.py).

The router's auxiliary losses are not returned: they are attached to the routing weights by
:class:`_AttachAuxLoss`, whose backward adds ``d(aux)/d(.) * aux_loss_scale`` (the scale the
LM loss is backpropagated with: loss scale / microbatches, :func:`set_aux_loss_scale`; the
trainer sets it each step), so pipeline stages need no extra plumbing. Their values and the
per-expert token counts are accumulated in the layer for logging (:mod:`megalite.model.moe_stats`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalite.model.config import GATED_ACTIVATIONS, TransformerConfig
from megalite.model.moe_dispatch import LocalDispatcher
from megalite.model.router import route, router_logits
from megalite.parallel import comm
from megalite.parallel.context import ModelContext
from megalite.parallel.sharding import set_sharding

__all__ = ["MoELayer", "Experts", "SharedExperts", "set_aux_loss_scale", "activation_fn"]

_AUX_LOSS_SCALE = [1.0]


def set_aux_loss_scale(scale: float) -> None:
    """The factor the router losses' gradients are backpropagated with (the LM loss's:
    ``loss_scale / num_microbatches``)."""
    _AUX_LOSS_SCALE[0] = float(scale)


class _AttachAuxLoss(torch.autograd.Function):
    """Forward: ``x`` unchanged. Backward: ``x``'s gradient, and ``aux_loss_scale`` for
    ``aux`` (as if ``aux * scale`` had been added to the backpropagated loss)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.save_for_backward(aux)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (aux,) = ctx.saved_tensors
        return g, torch.full_like(aux, _AUX_LOSS_SCALE[0])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (``_grouped_mm``'s backward
    refuses expanded gradients such as ``y.sum()``'s)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def activation_fn(activation: str, inner: Tensor) -> Tensor:
    """The MLP activation on ``inner`` [..., f] (gated: [..., 2f] as [gate; up] -> [..., f])."""
    if activation in GATED_ACTIVATIONS:
        gate, up = inner.chunk(2, dim=-1)
        act = F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")
        return act * up
    if activation == "relu":
        return F.relu(inner)
    return F.gelu(inner, approximate="tanh" if activation == "gelu_tanh" else "none")


def _param(shape, ctx: ModelContext, tp_dim: int | None, stride: int = 1,
           sequence_parallel: bool = False) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, device=ctx.device, dtype=ctx.dtype))
    return set_sharding(p, tp_dim, stride, sequence_parallel)


class ExpertMLP(nn.Module):
    """One expert's (or the shared experts') weights: ``linear_fc1.weight`` [F1/tp, h] and
    ``linear_fc2.weight`` [h, f/tp] (F1 = 2f gated, else f); no bias, no communication."""

    def __init__(self, h: int, f: int, gated: bool, ctx: ModelContext, expert: bool):
        super().__init__()
        tp = ctx.ps.tp_size
        self.linear_fc1 = nn.Module()
        self.linear_fc2 = nn.Module()
        self.linear_fc1.weight = _param(((2 * f if gated else f) // tp, h), ctx, 0,
                                        2 if gated else 1)
        self.linear_fc2.weight = _param((h, f // tp), ctx, 1)
        if expert:
            for p in (self.linear_fc1.weight, self.linear_fc2.weight):
                p.is_expert, p.allreduce = True, False

    def forward(self, x: Tensor, activation: str) -> Tensor:
        """``x`` [n, h] -> partial [n, h] (this rank's f/tp slice)."""
        return F.linear(activation_fn(activation, F.linear(x, self.linear_fc1.weight)),
                        self.linear_fc2.weight)


class Experts(nn.Module):
    """This rank's local experts, ``experts.<global id>``: ``forward(rows [N, h],
    tokens_per_expert [E_local]) -> partial [N, h]``, rows grouped by local expert."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext, first: int, count: int):
        super().__init__()
        self.activation = config.activation
        gated = config.activation in GATED_ACTIVATIONS
        for j in range(count):   # children named by global expert id: experts.<e>.linear_fc1
            self.add_module(str(first + j), ExpertMLP(config.hidden_size, config.moe_ffn_size,
                                                      gated, ctx, True))
        self.grouped = hasattr(torch, "_grouped_mm")

    def _grouped_ok(self, x: Tensor) -> bool:
        w = next(self.children()).linear_fc2.weight
        align = 16 // x.element_size()
        return (self.grouped and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and x.shape[0] > 0 and x.shape[1] % align == 0 and w.shape[1] % align == 0)

    def forward(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        experts = list(self.children())
        if self._grouped_ok(x):
            offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
            w1 = torch.stack([e.linear_fc1.weight for e in experts]).transpose(1, 2)
            w2 = torch.stack([e.linear_fc2.weight for e in experts]).transpose(1, 2)
            inner = _ContiguousGrad.apply(torch._grouped_mm(x, w1, offs=offs))
            out = torch._grouped_mm(activation_fn(self.activation, inner), w2, offs=offs)
            return _ContiguousGrad.apply(out)
        pieces = torch.split(x, tokens_per_expert.tolist())
        return torch.cat([e(p, self.activation) for e, p in zip(experts, pieces)])


class SharedExperts(nn.Module):
    """The always-on shared expert(s) (Qwen2-MoE, DeepSeek): a dense MLP of width
    ``--moe-shared-expert-intermediate-size``, optionally scaled per token by
    ``sigmoid(x . gate_weight)`` (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext):
        super().__init__()
        self.activation = config.activation
        mlp = ExpertMLP(config.hidden_size, config.moe_shared_expert_intermediate_size,
                        config.activation in GATED_ACTIVATIONS, ctx, False)
        self.linear_fc1, self.linear_fc2 = mlp.linear_fc1, mlp.linear_fc2
        sp = config.sequence_parallel and ctx.ps.tp_size > 1
        if config.moe_shared_expert_gate:
            self.gate_weight = _param((1, config.hidden_size), ctx, None, sequence_parallel=sp)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(activation_fn(self.activation, F.linear(x, self.linear_fc1.weight)),
                        self.linear_fc2.weight)


class MoELayer(nn.Module):
    """``forward(x [s, b, h]) -> [s, b, h]`` (SP: ``[s/tp, b, h]``); module doc."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext):
        super().__init__()
        ps = self.ps = ctx.ps
        self.config = config
        self.sp = config.sequence_parallel and ps.tp_size > 1
        e = config.num_experts
        ep_size, ep_rank = getattr(ps, "ep_size", 1), getattr(ps, "ep_rank", 0)
        self.num_local_experts = e // ep_size
        self.router = nn.Module()
        self.router.weight = _param((e, config.hidden_size), ctx, None,
                                    sequence_parallel=self.sp)
        self.experts = Experts(config, ctx, ep_rank * self.num_local_experts,
                               self.num_local_experts)
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = SharedExperts(config, ctx)
        self.dispatcher = self._build_dispatcher(ps, e)
        self.stats = None  # megalite.model.moe_stats.LayerStats, set by the trainer

    @staticmethod
    def _build_dispatcher(ps, num_experts: int):
        if getattr(ps, "ep_size", 1) > 1:
            from megalite.parallel.expert_dispatch import AllToAllDispatcher
            return AllToAllDispatcher(num_experts, ps)
        return LocalDispatcher(num_experts)

    def _per_token(self, x: Tensor, weight: Tensor) -> Tensor:
        """fp32 ``x W^T`` for every token of the full sequence, [s*b, out], identical on all tp
        ranks: ``x`` is replicated (SP: this rank's slice, the result all-gathered; the
        weight's gradient is then partial, summed over tp as a sequence-parallel parameter)."""
        out = router_logits(x.reshape(-1, x.shape[-1]), weight)
        return comm.gather_from_tp_region(out, self.ps, dim=0) if self.sp else out

    def forward(self, x: Tensor) -> Tensor:
        c, ps = self.config, self.ps
        s_local, b, h = x.shape
        logits = self._per_token(x, self.router.weight)               # [s*b, E] fp32
        r = route(logits, c.moe_router_topk, pre_softmax=c.moe_router_pre_softmax,
                  load_balancing_type=c.moe_router_load_balancing_type,
                  aux_loss_coeff=c.moe_aux_loss_coeff if self.training else 0.0,
                  z_loss_coeff=c.moe_z_loss_coeff if self.training else None,
                  capacity_factor=c.moe_expert_capacity_factor,
                  seq_batch=(logits.shape[0] // b, b))
        probs = r.probs
        if r.aux_loss.requires_grad or r.z_loss.requires_grad:
            probs = _AttachAuxLoss.apply(probs, r.aux_loss + r.z_loss)
        if self.stats is not None and self.training:
            self.stats.record(r)
        # the tp region: all tokens, each rank its slice of every expert's inner width
        full = (comm.gather_from_sequence_parallel_region(x, ps) if self.sp
                else comm.copy_to_tp_region(x, ps))
        tokens = full.reshape(-1, h)                                  # [T, h]
        rows, counts = self.dispatcher.dispatch(tokens, comm.copy_to_tp_region(probs, ps),
                                                r.expert_ids)
        y = self.dispatcher.combine(self.experts(rows, counts))       # [T, h] partial
        if hasattr(self, "shared_experts"):
            shared = self.shared_experts(tokens)
            if hasattr(self.shared_experts, "gate_weight"):
                gate = torch.sigmoid(self._per_token(x, self.shared_experts.gate_weight))
                shared = shared * comm.copy_to_tp_region(gate, ps).to(shared.dtype)
            y = y + shared
        y = y.view(-1, b, h)
        return (comm.reduce_scatter_to_sequence_parallel_region(y, ps) if self.sp
                else comm.reduce_from_tp_region(y, ps))
