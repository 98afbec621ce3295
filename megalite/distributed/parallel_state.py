"""Process-group layout: tensor (TP), context (CP), data (DP), pipeline (PP) and expert (EP)
parallelism.

One :class:`ParallelState` object describes the layout and holds this rank's groups; it is
passed explicitly to every layer and function that communicates (no module globals).

Rank order (as Megatron): tensor-parallel ranks are contiguous, then context-parallel, then
data-parallel, then pipeline-parallel (TP < CP < DP < PP)::

    rank = pp_rank * (tp * cp * dp) + dp_rank * (tp * cp) + cp_rank * tp + tp_rank

Why this order: the nearer two ranks are, the more likely they share a node's fast links, and
the groups are ordered by how much they talk. TP exchanges activations several times per layer
(every rank waits for it), CP passes every layer's keys/values around its ring (in the
attention's critical path too, but once per layer), DP reduces gradients once per step
(overlappable) and PP sends one activation per microbatch between neighbours. With cp = 1 the
order is the previous TP < DP < PP one, so layouts without CP keep their ranks. Example,
world 8 = tp 2 x dp 2 x pp 2 (cp 1)::

    tp groups [0,1] [2,3] [4,5] [6,7]     dp groups [0,2] [1,3] [4,6] [5,7]
    pp groups [0,4] [1,5] [2,6] [3,7]     mp (tp x pp) groups [0,1,4,5] [2,3,6,7]
    embedding groups (first and last stage of each pipeline; only when pp > 1): here the pp
    groups again; with pp = 4 they would be [stage 0, stage 3] of each pipeline.

and world 8 = tp 2 x cp 2 x dp 2: tp groups [0,1] [2,3] [4,5] [6,7], cp groups [0,2] [1,3]
[4,6] [5,7], dp groups [0,4] [1,5] [2,6] [3,7]. The context-parallel ranks of a group hold the
same weights and the same samples, each a part of every sequence
(:mod:`megalite.parallel.context_parallel`).

Expert parallelism (Megatron's layout) is carved out of the data-parallel ranks: the dp ranks
of one (tp, pp) coordinate split into blocks of ``ep`` consecutive dp ranks, each block one EP
group holding all experts between them (``ep_rank = dp_rank % ep``); the ranks with the same
``ep_rank`` (stride ``ep`` in dp order) form the expert-data-parallel group, over which expert
gradients are reduced (dense ones still over the whole dp group). World 8 = tp 2 x dp 4, ep 2::

    dp groups [0,2,4,6] [1,3,5,7]     ep groups [0,2] [4,6] [1,3] [5,7]
    expert-dp groups [0,4] [2,6] [1,5] [3,7]

:func:`rank_layout` computes all of this without processes (pure, unit-tested); ``build`` creates
the real groups after ``torch.distributed.init_process_group``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megalite.errors import MegaliteError

__all__ = ["RankLayout", "rank_layout", "ParallelState", "init_distributed"]


@dataclass(frozen=True)
class RankLayout:
    """Every process group of a layout, as lists of global ranks (no processes involved)."""

    world_size: int
    """Total number of processes."""
    tp_size: int
    """Tensor-parallel size."""
    pp_size: int
    """Pipeline-parallel size."""
    dp_size: int
    """Data-parallel size: world_size / (tp_size * pp_size)."""
    tp_groups: tuple[tuple[int, ...], ...]
    """Ranks holding the shards of the same layers (contiguous ranks)."""
    dp_groups: tuple[tuple[int, ...], ...]
    """Ranks holding identical model shards that see different data."""
    pp_groups: tuple[tuple[int, ...], ...]
    """Ranks forming one pipeline, ordered by stage."""
    mp_groups: tuple[tuple[int, ...], ...]
    """Model-parallel groups (tp x pp: one whole model replica), e.g. for global grad norms."""
    embedding_groups: tuple[tuple[int, ...], ...] = ()
    """Per (tp_rank, cp_rank, dp_rank): the first and the last pipeline stage, which hold the
    two copies of a tied word embedding (their gradients are summed over it). Empty when
    pp == 1."""
    cp_size: int = 1
    """Context-parallel size: ranks splitting each sequence."""
    cp_groups: tuple[tuple[int, ...], ...] = ()
    """Ranks holding the parts of the same sequences, in cp_rank order (tp stride apart)."""
    ep_size: int = 1
    """Expert-parallel size: ranks (out of the dp ranks) the experts are split over."""
    ep_groups: tuple[tuple[int, ...], ...] = ()
    """Ranks exchanging tokens for their experts: ``ep`` consecutive dp ranks of one (tp, pp)."""
    expert_dp_groups: tuple[tuple[int, ...], ...] = ()
    """Ranks holding the same experts (same ep_rank): dp ranks of stride ``ep``."""

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_rank)`` of a global rank (its cp_rank: :meth:`cp_rank_of`)."""
        if not 0 <= rank < self.world_size:
            raise MegaliteError(f"rank {rank} is outside world size {self.world_size}")
        tp_rank = rank % self.tp_size
        dp_rank = (rank // (self.tp_size * self.cp_size)) % self.dp_size
        pp_rank = rank // (self.tp_size * self.cp_size * self.dp_size)
        return tp_rank, dp_rank, pp_rank

    def cp_rank_of(self, rank: int) -> int:
        """The context-parallel rank of a global rank."""
        return (rank // self.tp_size) % self.cp_size

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int, cp_rank: int = 0) -> int:
        """Global rank of the given coordinates."""
        tc = self.tp_size * self.cp_size
        return pp_rank * tc * self.dp_size + dp_rank * tc + cp_rank * self.tp_size + tp_rank

    def group_of(self, groups: tuple[tuple[int, ...], ...], rank: int) -> tuple[int, ...]:
        """The group among ``groups`` that contains ``rank``."""
        return next(g for g in groups if rank in g)


def rank_layout(world_size: int, tensor_model_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1,
                context_parallel_size: int = 1, expert_model_parallel_size: int = 1
                ) -> RankLayout:
    """Compute every group of the layout; MegaliteError if the sizes do not fit the world."""
    tp, pp, cp, ep = (tensor_model_parallel_size, pipeline_model_parallel_size,
                      context_parallel_size, expert_model_parallel_size)
    for flag, value in (("--tensor-model-parallel-size", tp),
                        ("--pipeline-model-parallel-size", pp),
                        ("--context-parallel-size", cp),
                        ("--expert-model-parallel-size", ep), ("world size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise MegaliteError(f"{flag} must be a positive integer, got {value!r}")
    if world_size % (tp * cp * pp) != 0:
        cp_part = f" x --context-parallel-size {cp}" if cp > 1 else ""
        raise MegaliteError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp}"
            f"{cp_part} x --pipeline-model-parallel-size {pp} = {tp * cp * pp}; choose sizes "
            f"whose product divides the number of processes")
    dp = world_size // (tp * cp * pp)
    if ep > 1 and cp > 1:
        raise MegaliteError(f"--expert-model-parallel-size {ep} with --context-parallel-size "
                            f"{cp}: expert and context parallelism together are not "
                            f"implemented; use one of them")
    if dp % ep:
        raise MegaliteError(
            f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} "
            f"(world {world_size} / (tp {tp} x pp {pp})): expert-parallel ranks are carved out "
            f"of the data-parallel ranks")

    def r(t: int, d: int, p: int, c: int = 0) -> int:
        return p * tp * cp * dp + d * tp * cp + c * tp + t

    every = [(t, c, d) for d in range(dp) for c in range(cp) for t in range(tp)]
    tp_groups = tuple(tuple(r(t, d, p, c) for t in range(tp))
                      for p in range(pp) for d in range(dp) for c in range(cp))
    cp_groups = tuple(tuple(r(t, d, p, c) for c in range(cp))
                      for p in range(pp) for d in range(dp) for t in range(tp))
    dp_groups = tuple(tuple(r(t, d, p, c) for d in range(dp))
                      for p in range(pp) for c in range(cp) for t in range(tp))
    pp_groups = tuple(tuple(r(t, d, p, c) for p in range(pp)) for t, c, d in every)
    mp_groups = tuple(tuple(sorted(r(t, d, p, c) for p in range(pp) for t in range(tp)))
                      for d in range(dp) for c in range(cp))
    embedding_groups = (tuple((r(t, d, 0, c), r(t, d, pp - 1, c)) for t, c, d in every)
                        if pp > 1 else ())
    # dp index d = e_dp * ep + e: ep inner (consecutive), expert-dp outer (Megatron's order)
    # (over every cp rank too: with cp > 1, ep is 1 and these are the singletons / dp groups)
    ep_groups = tuple(tuple(r(t, x * ep + e, p, c) for e in range(ep))
                      for p in range(pp) for c in range(cp) for t in range(tp)
                      for x in range(dp // ep))
    expert_dp_groups = tuple(tuple(r(t, x * ep + e, p, c) for x in range(dp // ep))
                             for p in range(pp) for c in range(cp) for t in range(tp)
                             for e in range(ep))
    return RankLayout(world_size, tp, pp, dp, tp_groups, dp_groups, pp_groups, mp_groups,
                      embedding_groups, cp, cp_groups, ep, ep_groups, expert_dp_groups)


@dataclass(frozen=True)
class ParallelState:
    """This process's place in the layout and its process groups.

    Groups are ``None`` when there is no ``torch.distributed`` (``single``/``for_shapes``); code
    must then not communicate, which every collective in megalite guarantees by checking the
    relevant size first (a size-1 group never communicates).
    """

    tp_size: int
    """Tensor-parallel size: ranks sharing the layers' weights (Megatron's TP)."""
    pp_size: int
    """Pipeline-parallel size: stages the layers are split into."""
    dp_size: int
    """Data-parallel size: model replicas."""
    rank: int
    """Global rank."""
    world_size: int
    """Global number of processes (tp_size * cp_size * pp_size * dp_size)."""
    tp_rank: int
    """Rank inside the tensor-parallel group (which vocabulary/column/row shard it holds)."""
    pp_rank: int
    """Pipeline stage of this rank."""
    dp_rank: int
    """Replica index of this rank (which data it reads)."""
    tp_group: dist.ProcessGroup | None = None
    """Tensor-parallel process group, None when not distributed."""
    pp_group: dist.ProcessGroup | None = None
    """Pipeline process group, None when not distributed."""
    dp_group: dist.ProcessGroup | None = None
    """Data-parallel process group, None when not distributed."""
    mp_group: dist.ProcessGroup | None = None
    """Model-parallel (tp x pp) process group, None when not distributed."""
    tp_group_ranks: tuple[int, ...] = field(default=(0,))
    """Global ranks of this rank's tensor-parallel group, in tp_rank order."""
    pp_group_ranks: tuple[int, ...] = field(default=(0,))
    """Global ranks of this rank's pipeline group, in stage order (for p2p send/recv)."""
    dp_group_ranks: tuple[int, ...] = field(default=(0,))
    """Global ranks of this rank's data-parallel group, in dp_rank order."""
    mp_group_ranks: tuple[int, ...] = field(default=(0,))
    """Global ranks of this rank's model-parallel group, sorted."""
    embedding_group: dist.ProcessGroup | None = None
    """Group of the first and last pipeline stage of this rank's (tp_rank, dp_rank): the
    ranks holding a tied word embedding's two copies. Only on those two ranks, only when
    pp > 1 and distributed; None otherwise."""
    embedding_ranks: tuple[int, ...] | None = None
    """Global ranks (first stage, last stage) of this rank's (tp_rank, cp_rank, dp_rank)
    pipeline, for every rank of it; None when pp == 1."""
    cp_size: int = 1
    """Context-parallel size: ranks each sequence is split over (same weights, same samples)."""
    cp_rank: int = 0
    """Rank inside the context-parallel group (which chunks of each sequence it holds)."""
    cp_group: dist.ProcessGroup | None = None
    """Context-parallel process group; None when cp == 1 or not distributed."""
    cp_group_ranks: tuple[int, ...] = field(default=(0,))
    """Global ranks of this rank's context-parallel group, in cp_rank order (the ring)."""

    ep_size: int = 1
    """Expert-parallel size: the experts are split over this many of the dp ranks."""
    ep_rank: int = 0
    """Which block of experts this rank holds (``dp_rank % ep_size``)."""
    ep_group: dist.ProcessGroup | None = None
    """Group exchanging tokens with all-to-all (ep consecutive dp ranks); None when ep == 1
    or not distributed."""
    ep_group_ranks: tuple[int, ...] = field(default=(0,))
    """Global ranks of this rank's expert-parallel group, in ep_rank order."""
    expert_dp_size: int = 1
    """Ranks holding the same experts: dp_size // ep_size."""
    expert_dp_group: dist.ProcessGroup | None = None
    """Group over which expert gradients are averaged (the dp group itself when ep == 1);
    None when not distributed."""
    expert_dp_group_ranks: tuple[int, ...] = field(default=(0,))
    """Global ranks of this rank's expert-data-parallel group, in dp_rank order."""

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def build(cls, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
              context_parallel_size: int = 1,
              expert_model_parallel_size: int = 1) -> "ParallelState":
        """Create every group of the layout; call on all ranks after ``init_process_group``.

        All ranks must call this with the same sizes (``new_group`` is collective).
        """
        if not dist.is_available() or not dist.is_initialized():
            raise MegaliteError("ParallelState.build needs torch.distributed to be initialized "
                                "first (call megalite.distributed.parallel_state.init_distributed)")
        world, rank = dist.get_world_size(), dist.get_rank()
        layout = rank_layout(world, tensor_model_parallel_size, pipeline_model_parallel_size,
                             context_parallel_size, expert_model_parallel_size)
        tp_rank, dp_rank, pp_rank = layout.coordinates(rank)

        def mine(groups: tuple[tuple[int, ...], ...]) -> dist.ProcessGroup:
            # new_group is collective over the whole world: every rank creates every group in
            # the same order and keeps the one it belongs to.
            found = None
            for ranks in groups:
                g = dist.new_group(list(ranks))
                if rank in ranks:
                    found = g
            return found

        dp_group = mine(layout.dp_groups)
        mp_group = mine(layout.mp_groups)
        # created after the dense groups and only when pp > 1 / ep > 1 (the same on every
        # rank), so the order of new_group calls is identical everywhere
        embedding_group = mine(layout.embedding_groups) if layout.pp_size > 1 else None
        ep = layout.ep_size
        ep_group = mine(layout.ep_groups) if ep > 1 else None
        expert_dp_group = mine(layout.expert_dp_groups) if ep > 1 else dp_group
        return cls(
            tp_size=layout.tp_size, pp_size=layout.pp_size, dp_size=layout.dp_size,
            rank=rank, world_size=world, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
            tp_group=mine(layout.tp_groups), pp_group=mine(layout.pp_groups),
            dp_group=dp_group, mp_group=mp_group,
            tp_group_ranks=layout.group_of(layout.tp_groups, rank),
            pp_group_ranks=layout.group_of(layout.pp_groups, rank),
            dp_group_ranks=layout.group_of(layout.dp_groups, rank),
            mp_group_ranks=layout.group_of(layout.mp_groups, rank),
            embedding_group=embedding_group, embedding_ranks=_embedding_ranks(layout, rank),
            **_expert_coordinates(layout, rank), ep_group=ep_group,
            expert_dp_group=expert_dp_group,
            # last and only when cp > 1: layouts without CP create the same groups as before
            # it existed
            cp_size=layout.cp_size, cp_rank=layout.cp_rank_of(rank),
            cp_group=mine(layout.cp_groups) if layout.cp_size > 1 else None,
            cp_group_ranks=layout.group_of(layout.cp_groups, rank),
        )

    @classmethod
    def single(cls) -> "ParallelState":
        """One process, no parallelism, no ``torch.distributed`` needed."""
        return cls(tp_size=1, pp_size=1, dp_size=1, rank=0, world_size=1,
                   tp_rank=0, pp_rank=0, dp_rank=0)

    @classmethod
    def for_shapes(cls, tp_size: int, tp_rank: int = 0, pp_size: int = 1, pp_rank: int = 0,
                   dp_size: int = 1, ep_size: int = 1, ep_rank: int = 0) -> "ParallelState":
        """A group-less state for building a rank's model (e.g. on the meta device) to inspect
        its per-rank shapes; it must never be used to communicate. ``ep_rank`` picks which
        experts it holds (its dp_rank is then ``ep_rank``)."""
        layout = rank_layout(tp_size * pp_size * dp_size, tp_size, pp_size,
                             expert_model_parallel_size=ep_size)
        for name, value, size in (("tp_rank", tp_rank, tp_size), ("pp_rank", pp_rank, pp_size),
                                  ("ep_rank", ep_rank, ep_size)):
            if not 0 <= value < size:
                raise MegaliteError(f"{name} {value} is outside size {size}")
        rank = layout.rank_of(tp_rank, ep_rank, pp_rank)
        return cls(tp_size=tp_size, pp_size=pp_size, dp_size=dp_size, rank=rank,
                   world_size=layout.world_size, tp_rank=tp_rank, pp_rank=pp_rank,
                   dp_rank=ep_rank, **_expert_coordinates(layout, rank),
                   tp_group_ranks=layout.group_of(layout.tp_groups, rank),
                   pp_group_ranks=layout.group_of(layout.pp_groups, rank),
                   dp_group_ranks=layout.group_of(layout.dp_groups, rank),
                   mp_group_ranks=layout.group_of(layout.mp_groups, rank),
                   embedding_ranks=_embedding_ranks(layout, rank))

    # -- helpers -----------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        """True when this state holds real process groups."""
        return self.tp_group is not None

    @property
    def is_first_pp_stage(self) -> bool:
        """True on the pipeline stage that holds the input embedding."""
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        """True on the pipeline stage that holds the output layer and computes the loss."""
        return self.pp_rank == self.pp_size - 1

    def layout(self) -> RankLayout:
        """All groups of this layout as rank lists."""
        return rank_layout(self.world_size, self.tp_size, self.pp_size, self.cp_size,
                           self.ep_size)

    def __deepcopy__(self, memo: dict) -> "ParallelState":
        # Immutable, and process groups are shared handles that cannot be copied: deep-copying a
        # model (EMA weights, tests) must share the state rather than fail on the groups.
        return self

    def __copy__(self) -> "ParallelState":
        return self

    def __repr__(self) -> str:  # groups are opaque handles; print the coordinates
        cp = f", cp={self.cp_rank}/{self.cp_size}" if self.cp_size > 1 else ""
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/"
                f"{self.tp_size}{cp}, dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/"
                f"{self.pp_size}, ep={self.ep_rank}/{self.ep_size}, "
                f"distributed={self.distributed})")


def _embedding_ranks(layout: RankLayout, rank: int) -> tuple[int, ...] | None:
    """(first stage, last stage) of ``rank``'s pipeline; None when pp == 1."""
    if layout.pp_size == 1:
        return None
    tp_rank, dp_rank, _ = layout.coordinates(rank)
    cp_rank = layout.cp_rank_of(rank)
    return (layout.rank_of(tp_rank, dp_rank, 0, cp_rank),
            layout.rank_of(tp_rank, dp_rank, layout.pp_size - 1, cp_rank))


def _expert_coordinates(layout: RankLayout, rank: int) -> dict:
    """``ep_size``, ``ep_rank``, ``expert_dp_size`` and the two group rank lists of ``rank``."""
    _, dp_rank, _ = layout.coordinates(rank)
    ep = layout.ep_size
    return dict(ep_size=ep, ep_rank=dp_rank % ep, expert_dp_size=layout.dp_size // ep,
                ep_group_ranks=layout.group_of(layout.ep_groups, rank),
                expert_dp_group_ranks=layout.group_of(layout.expert_dp_groups, rank))


def resolve_backend(backend: str | None) -> str:
    """``None`` -> NCCL when CUDA is available, else gloo; an unknown or unusable name is an error."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise MegaliteError(f"unknown torch.distributed backend {backend!r} (use gloo or nccl)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise MegaliteError("backend nccl needs CUDA, which is not available")
    return backend


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> None:
    """Initialize ``torch.distributed`` from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``.

    ``backend``: ``None`` picks NCCL when CUDA is available, else gloo. On CUDA the current
    device becomes ``LOCAL_RANK``. A no-op when already initialized.
    """
    if dist.is_initialized():
        return
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise MegaliteError(
            f"cannot initialize torch.distributed: environment variable(s) {', '.join(missing)} "
            f"not set (launch with torchrun, or srun/mpirun through megalite's launcher)")
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=timedelta(seconds=timeout_s))
