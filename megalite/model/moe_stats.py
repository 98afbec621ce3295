"""Router statistics of the MoE layers for the training log: the load-balancing and z losses
(as added to the loss, i.e. with their coefficients) and the tokens routed to each expert.

Each :class:`~megalite.model.moe.MoELayer` of a training model holds a :class:`LayerStats`
(:func:`attach`) and records every training forward (not the recompute of ``--recompute-*``,
which runs inside the backward pass). :func:`collect` sums them over all ranks every
``--log-interval`` (a collective: every rank calls it) and resets them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megalite.distributed.parallel_state import ParallelState

__all__ = ["LayerStats", "attach", "collect"]


class LayerStats:
    """Sums over the recorded forwards of one MoE layer (detached, on the layer's device)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.forwards = 0
        self.aux = self.z = 0.0
        self.tokens = torch.zeros(self.num_experts, dtype=torch.int64)

    def record(self, routing) -> None:
        """Add one forward's :class:`~megalite.model.router.Routing`; a recompute in the
        backward pass (activation checkpointing) is not counted again."""
        if torch._C._current_graph_task_id() != -1:
            return
        self.forwards += 1
        self.aux = self.aux + routing.aux_loss.detach()
        self.z = self.z + routing.z_loss.detach()
        self.tokens = self.tokens.to(routing.tokens_per_expert.device) + \
            routing.tokens_per_expert.detach()


def attach(chunks: list[nn.Module]) -> list[tuple[int, LayerStats]]:
    """Give every MoE layer of ``chunks`` a :class:`LayerStats`; returns (layer id, stats)."""
    from megalite.model.moe import MoELayer
    found = []
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, MoELayer):
                module.stats = LayerStats(module.config.num_experts)
                found.append((int(name.split(".")[-2]), module.stats))
    return found


def collect(stats: list[tuple[int, LayerStats]], num_layers: int, num_experts: int,
            num_microbatches: int, ps: ParallelState, device) -> dict:
    """The metrics since the last call (``num_microbatches`` forwards per iteration and
    data-parallel rank), identical on every rank, and
    the stats reset: ``moe_aux_loss`` and ``moe_z_loss`` (per MoE layer and forward: the mean
    over layers, microbatches, iterations and data-parallel ranks), ``moe_expert_tokens``
    (assignments to each expert per iteration, summed over the MoE layers and the global
    batch) and ``moe_max_load`` (the largest of those over their mean; 1.0 is balanced).
    One all-reduce over the world."""
    table = torch.zeros(num_layers, 3 + num_experts, dtype=torch.float64, device=device)
    for layer, st in stats:
        if ps.tp_rank == 0:  # the tp ranks of a layer hold the same routing
            table[layer, 0] = float(st.forwards)
            table[layer, 1] = float(st.aux)
            table[layer, 2] = float(st.z)
            table[layer, 3:] = st.tokens.to(device=device, dtype=torch.float64)
        st.reset()
    if ps.world_size > 1:
        dist.all_reduce(table)
    used = table[:, 0] > 0
    if not bool(used.any()):
        return {}
    forwards = table[used, 0]
    iterations = forwards / (num_microbatches * ps.dp_size)
    tokens = (table[used, 3:] / iterations[:, None]).sum(dim=0)
    mean = float(tokens.mean())
    return {
        "moe_aux_loss": float((table[used, 1] / forwards).mean()),
        "moe_z_loss": float((table[used, 2] / forwards).mean()),
        "moe_expert_tokens": [round(float(v), 3) for v in tokens],
        "moe_max_load": float(tokens.max()) / mean if mean else 0.0,
    }
