"""The feed-forward block: h -> f -> h, split over tensor-parallel ranks along f.

``linear_fc1`` is column-parallel (each rank computes f/tp of the inner activations, no
communication), ``linear_fc2`` row-parallel (partial sums all-reduced, or reduce-scattered along
the sequence under sequence parallelism). The activation acts elementwise on the inner width,
so it needs no communication.

The gated activations (SwiGLU, and T5 v1.1's GEGLU with the tanh GELU) fuse the gate and up
projections into one GEMM: the full ``linear_fc1.weight`` is ``[gate; up]`` ([2f, h]) and is
sharded with ``partition_stride=2``, so rank r holds ``[gate_r; up_r]`` and can split its own
output in two halves.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megalite.model.config import GATED_ACTIVATIONS, TransformerConfig
from megalite.parallel.context import ModelContext
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """``forward(x [s, b, h]) -> [s, b, h]`` (with SP: [s/tp, b, h] in and out)."""

    def __init__(self, config: TransformerConfig, ctx: ModelContext):
        super().__init__()
        self.activation = config.activation
        gated = config.activation in GATED_ACTIVATIONS
        h, f, sp = config.hidden_size, config.ffn_size, config.sequence_parallel
        self.linear_fc1 = ColumnParallelLinear(
            h, 2 * f if gated else f, ctx, bias=config.add_bias_linear, gather_output=False,
            sequence_parallel=sp, partition_stride=2 if gated else 1)
        self.linear_fc2 = RowParallelLinear(
            f, h, ctx, bias=config.add_bias_linear, input_is_parallel=True, sequence_parallel=sp)

    def forward(self, x: Tensor) -> Tensor:
        inner = self.linear_fc1(x)                              # [s, b, f/tp] (x2 for swiglu)
        if self.activation in GATED_ACTIVATIONS:
            gate, up = inner.chunk(2, dim=-1)
            act = F.silu(gate) if self.activation == "swiglu" else F.gelu(gate, approximate="tanh")
            inner = act * up
        elif self.activation == "relu":
            inner = F.relu(inner)
        else:
            approx = "tanh" if self.activation == "gelu_tanh" else "none"
            inner = F.gelu(inner, approximate=approx)
        return self.linear_fc2(inner)
