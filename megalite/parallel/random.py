"""Random streams for tensor parallelism, and activation recompute that replays them.

Dropout must agree across TP ranks where activations are replicated (after a row-parallel layer,
in the residual stream without SP) and must differ where each rank holds a different part (the
attention probabilities of its own heads, SP sequence shards): otherwise the TP model is not the
same random function as the unsplit one. Two streams:

* torch's default generator, seeded identically on all TP ranks: replicated regions.
* the tracker's ``"model-parallel"`` stream, seeded ``seed + 2718 + tp_rank``: split regions,
  used as ``with tracker.fork(): x = dropout(x)``.

``checkpoint`` recomputes a function in backward with the same CPU/CUDA generator states *and*
the same tracker states as in forward, so recomputed dropout masks equal the original ones.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import Tensor

from megalite.distributed.parallel_state import ParallelState

__all__ = ["RNGStatesTracker", "model_parallel_seed", "checkpoint", "eager", "MODEL_PARALLEL_RNG",
           "TP_SEED_OFFSET", "PP_SEED_STRIDE"]

MODEL_PARALLEL_RNG = "model-parallel"
TP_SEED_OFFSET = 2718   # model-parallel stream seed = seed + 2718 + tp_rank (as Megatron)
PP_SEED_STRIDE = 100    # each pipeline stage offsets the seed so stages don't share masks


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RNGStatesTracker:
    """Named generator states that can be swapped in temporarily with :meth:`fork`.

    Each name holds a CPU state and, when CUDA is in use, a state for the current CUDA device;
    ``fork`` installs them into torch's default generators, runs the block, saves the advanced
    states back and restores the previous default states.
    """

    def __init__(self) -> None:
        self._states: dict[str, dict[str, Tensor | None]] = {}
        self._seeds: dict[str, int] = {}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (names and seeds must be unique)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        if seed in self._seeds.values():
            raise ValueError(f"seed {seed} is already used by another RNG stream")
        cpu = torch.Generator(device="cpu")
        cpu.manual_seed(seed)
        cuda = None
        if torch.cuda.is_available():
            g = torch.Generator(device=f"cuda:{torch.cuda.current_device()}")
            g.manual_seed(seed)
            cuda = g.get_state()
        self._states[name] = {"cpu": cpu.get_state(), "cuda": cuda}
        self._seeds[name] = seed

    def names(self) -> list[str]:
        """Names of the streams."""
        return list(self._states)

    def get_states(self) -> dict[str, dict[str, Any]]:
        """A copy of every stream's state (for checkpoints and recompute)."""
        return {n: {k: (v.clone() if v is not None else None) for k, v in s.items()}
                for n, s in self._states.items()}

    def set_states(self, states: dict[str, dict[str, Any]]) -> None:
        """Replace the streams' states (from :meth:`get_states`)."""
        self._states = {n: {k: (v.clone() if v is not None else None) for k, v in s.items()}
                        for n, s in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with stream ``name`` as torch's default CPU (and CUDA) generator."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added (have {self.names()})")
        state = self._states[name]
        use_cuda = state["cuda"] is not None and _cuda_ready()
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state() if use_cuda else None
        torch.set_rng_state(state["cpu"])
        if use_cuda:
            torch.cuda.set_rng_state(state["cuda"])
        try:
            yield
        finally:
            state["cpu"] = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if use_cuda:
                state["cuda"] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)


def model_parallel_seed(seed: int, ps: ParallelState) -> RNGStatesTracker:
    """Seed torch's default generators and return a tracker with the ``"model-parallel"`` stream.

    Default generator: ``seed + 100 * pp_rank`` on every rank of a pipeline stage (identical
    across TP and DP ranks, so replicated dropout agrees). Model-parallel stream: that value
    ``+ 2718 + tp_rank`` (different on each TP rank). Everything follows from ``--seed``.
    """
    stage_seed = seed + PP_SEED_STRIDE * ps.pp_rank
    torch.manual_seed(stage_seed)  # CPU and every CUDA device
    tracker = RNGStatesTracker()
    tracker.add(MODEL_PARALLEL_RNG, stage_seed + TP_SEED_OFFSET + ps.tp_rank)
    return tracker


def checkpoint(function: Callable[..., Any], tracker: RNGStatesTracker | None, *args: Any) -> Any:
    """``function(*args)`` without keeping its activations: they are recomputed in backward.

    Uses torch's non-reentrant checkpoint (which restores the CPU and CUDA default generators
    for the recompute) and additionally restores ``tracker``'s streams, so dropout drawn inside
    ``tracker.fork()`` repeats the same masks. Gradients are identical to calling
    ``function(*args)`` directly.
    """
    if tracker is None:
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    recorded: dict[str, Any] = {}

    @contextlib.contextmanager
    def record_forward() -> Iterator[None]:
        recorded["states"] = tracker.get_states()
        yield

    @contextlib.contextmanager
    def replay_in_recompute() -> Iterator[None]:
        current = tracker.get_states()
        tracker.set_states(recorded["states"])
        try:
            yield
        finally:
            tracker.set_states(current)

    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False,
        context_fn=lambda: (record_forward(), replay_in_recompute()))


@torch.compiler.disable
def eager(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, never traced by torch.compile (``--compile``): a compiled region
    reaching it stops its graph there (a graph break) and runs it, and everything it calls,
    eagerly. For what draws from the tracker's streams or the default generator (dropout,
    recompute that replays them): the eager masks and generator states, identical to a run
    without ``--compile``. A plain call outside compiled code."""
    return function(*args)
