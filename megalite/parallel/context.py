"""The model context: what every model module's and parallel layer's constructor needs besides
its own shapes, passed as one object.

``Attention(config, ctx)``, ``ColumnParallelLinear(h, f, ctx, ...)``, ``GPTModel(config, ctx)``:
``ctx.ps`` (this rank's layout: the layers shard by ``ps.tp_rank`` / ``ps.tp_size`` and
communicate in ``ps.tp_group``), ``ctx.rng_tracker`` (dropout streams), ``ctx.device`` and
``ctx.dtype`` (where and in which dtype parameters are created). A module builds its children
with the same context, or with :meth:`ModelContext.on_meta` to create them without memory and
without drawing any initial values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megalite.distributed.parallel_state import ParallelState
from megalite.parallel.random import MODEL_PARALLEL_RNG, TP_SEED_OFFSET, RNGStatesTracker

__all__ = ["ModelContext"]


@dataclass(frozen=True)
class ModelContext:
    """This rank's layout, dropout RNG streams, parameter device and dtype."""

    ps: ParallelState
    """This rank's parallel layout (the model modules use only its ``tp_*`` part)."""
    rng_tracker: RNGStatesTracker | None = None
    """Dropout streams, normally ``model_parallel_seed(seed, ps)`` from the trainer; by default
    a private tracker whose "model-parallel" stream is seeded ``TP_SEED_OFFSET + tp_rank``
    (enough for dropout-free use and tests)."""
    device: torch.device | str | None = None
    """Where parameters are created (None: torch's default device; ``"meta"``: shapes only)."""
    dtype: torch.dtype | None = None
    """Parameter dtype (None: torch's default, float32)."""

    def __post_init__(self) -> None:
        if self.rng_tracker is None:
            tracker = RNGStatesTracker()
            tracker.add(MODEL_PARALLEL_RNG, TP_SEED_OFFSET + self.ps.tp_rank)
            object.__setattr__(self, "rng_tracker", tracker)

    @property
    def is_meta(self) -> bool:
        """True when parameters are created on the meta device (no storage, no init)."""
        return self.resolved_device().type == "meta"

    def resolved_device(self) -> torch.device:
        """``device``, or torch's current default device when it is None."""
        return torch.device(self.device) if self.device is not None \
            else torch.get_default_device()

    def on_meta(self) -> "ModelContext":
        """The same context on the meta device (same ``ps``, tracker and dtype)."""
        return dataclasses.replace(self, device="meta")
