"""ParallelState layout arithmetic, without processes (the real 4-process check of the same
groups is tests/distributed/test_parallel_layers.py::test_parallel_state_groups_match_layout)."""
from __future__ import annotations

import itertools

import pytest

from megalite.distributed.parallel_state import ParallelState, init_distributed, rank_layout
from megalite.errors import MegaliteError


def test_world8_tp2_pp2_dp2_groups_by_hand():
    lay = rank_layout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert lay.dp_size == 2
    assert lay.tp_groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert lay.dp_groups == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert lay.pp_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert lay.mp_groups == ((0, 1, 4, 5), (2, 3, 6, 7))
    # rank = pp_rank*(tp*dp) + dp_rank*tp + tp_rank
    assert lay.coordinates(5) == (1, 0, 1)  # (tp_rank, dp_rank, pp_rank)
    assert lay.coordinates(6) == (0, 1, 1)


def test_world8_extreme_layouts_by_hand():
    assert rank_layout(8, 8).tp_groups == (tuple(range(8)),)
    assert rank_layout(8, 8).dp_groups == tuple((r,) for r in range(8))
    assert rank_layout(8, 1, 8).pp_groups == (tuple(range(8)),)
    assert rank_layout(8).dp_groups == (tuple(range(8)),)
    lay = rank_layout(8, 4, 2)
    assert lay.tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7)) and lay.pp_groups[1] == (1, 5)
    lay = rank_layout(8, 2, 4)
    assert lay.dp_groups == ((0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,))
    assert lay.pp_groups == ((0, 2, 4, 6), (1, 3, 5, 7))


@pytest.mark.parametrize("world", [1, 2, 4, 8, 12, 16])
def test_every_layout_is_consistent(world):
    for tp, pp in itertools.product(range(1, world + 1), repeat=2):
        if world % (tp * pp):
            continue
        lay = rank_layout(world, tp, pp)
        coords = [lay.coordinates(r) for r in range(world)]
        assert len(set(coords)) == world  # a bijection ranks <-> coordinates
        assert all(lay.rank_of(*c) == r for r, c in enumerate(coords))
        # Each kind of group partitions the world; inside a group only its own coordinate varies,
        # in order.
        for groups, axis, size in ((lay.tp_groups, 0, tp), (lay.dp_groups, 1, lay.dp_size),
                                   (lay.pp_groups, 2, pp)):
            assert sorted(r for g in groups for r in g) == list(range(world))
            for g in groups:
                assert [coords[r][axis] for r in g] == list(range(size))
                others = {tuple(c for i, c in enumerate(coords[r]) if i != axis) for r in g}
                assert len(others) == 1
        for g in lay.mp_groups:  # one whole model replica: a single dp_rank, all tp x pp
            assert len(g) == tp * pp and len({coords[r][1] for r in g}) == 1


def test_layout_not_dividing_world_is_a_clear_error():
    with pytest.raises(MegaliteError, match=r"world size 8 is not divisible by "
                                            r"--tensor-model-parallel-size 3 x "
                                            r"--pipeline-model-parallel-size 1"):
        rank_layout(8, 3)
    with pytest.raises(MegaliteError, match="world size 6 is not divisible"):
        rank_layout(6, 2, 2)
    with pytest.raises(MegaliteError, match="--tensor-model-parallel-size must be a positive"):
        rank_layout(8, 0)
    with pytest.raises(MegaliteError, match="outside world size"):
        rank_layout(8, 2).coordinates(8)


def test_single_and_for_shapes_need_no_torch_distributed():
    ps = ParallelState.single()
    assert (ps.tp_size, ps.pp_size, ps.dp_size, ps.rank, ps.world_size) == (1, 1, 1, 0, 1)
    assert ps.tp_group is None and not ps.distributed
    assert ps.is_first_pp_stage and ps.is_last_pp_stage
    ps = ParallelState.for_shapes(8, tp_rank=3, pp_size=2, pp_rank=1)
    assert (ps.tp_rank, ps.pp_rank, ps.world_size, ps.rank) == (3, 1, 16, 11)
    assert ps.tp_group_ranks == tuple(range(8, 16)) and ps.pp_group_ranks == (3, 11)
    assert not ps.is_first_pp_stage and ps.is_last_pp_stage and not ps.distributed
    with pytest.raises(MegaliteError, match="tp_rank 8 is outside size 8"):
        ParallelState.for_shapes(8, tp_rank=8)


def test_build_and_init_without_environment_are_clear_errors(monkeypatch):
    with pytest.raises(MegaliteError, match="needs torch.distributed to be initialized"):
        ParallelState.build(2)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MegaliteError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"):
        init_distributed()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(MegaliteError, match="unknown torch.distributed backend 'mpi'"):
        init_distributed("mpi")


def test_deepcopy_shares_the_state():
    import copy

    ps = ParallelState.for_shapes(2, 1)
    assert copy.deepcopy(ps) is ps and copy.copy(ps) is ps


def test_expert_groups_world8_by_hand():
    lay = rank_layout(8, 2, 1, expert_model_parallel_size=2)   # tp 2 x dp 4, ep 2 carved out of dp
    assert lay.dp_groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert lay.ep_groups == ((0, 2), (4, 6), (1, 3), (5, 7))
    assert lay.expert_dp_groups == ((0, 4), (2, 6), (1, 5), (3, 7))
    assert rank_layout(4, 1, 1, expert_model_parallel_size=4).ep_groups == ((0, 1, 2, 3),)
    assert rank_layout(4, 1, 1, expert_model_parallel_size=4).expert_dp_groups == ((0,), (1,), (2,), (3,))
    assert rank_layout(4).expert_dp_groups == rank_layout(4).dp_groups   # ep 1


@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_expert_groups_equal_megatron_core(world):
    """Every (tp, pp, ep) of the world gives megatron-core 0.16.1's expert groups (its
    RankGenerator with the expert order ``tp-ep-dp-pp`` and expert tp = tp, as Megatron builds
    them when --expert-tensor-parallel-size is left at its default)."""
    from megatron.core.parallel_state import RankGenerator
    seen = 0
    for tp, pp, ep in itertools.product(range(1, world + 1), repeat=3):
        if world % (tp * pp) or (world // (tp * pp)) % ep:
            continue
        lay = rank_layout(world, tp, pp, expert_model_parallel_size=ep)
        gen = RankGenerator(tp=tp, ep=ep, dp=lay.dp_size // ep, pp=pp, cp=1,
                            order="tp-ep-dp-pp")
        assert sorted(lay.ep_groups) == sorted(tuple(g) for g in gen.get_ranks("ep"))
        assert sorted(lay.expert_dp_groups) == sorted(tuple(g) for g in gen.get_ranks("dp"))
        for e in range(ep):
            ps = ParallelState.for_shapes(tp, tp - 1, pp, pp - 1, lay.dp_size, ep, e)
            assert ps.ep_group_ranks == lay.group_of(lay.ep_groups, ps.rank)
            assert ps.expert_dp_group_ranks == lay.group_of(lay.expert_dp_groups, ps.rank)
        for r in range(world):
            ep_group = lay.group_of(lay.ep_groups, r)
            assert set(ep_group) <= set(lay.group_of(lay.dp_groups, r))
            assert ep_group.index(r) == lay.coordinates(r)[1] % ep
        seen += ep > 1
    assert seen > 0


def test_for_shapes_expert_rank():
    ps = ParallelState.for_shapes(2, tp_rank=1, dp_size=4, ep_size=2, ep_rank=1)
    assert (ps.ep_size, ps.ep_rank, ps.expert_dp_size, ps.dp_rank, ps.rank) == (2, 1, 2, 1, 3)
    assert ps.ep_group_ranks == (1, 3) and ps.expert_dp_group_ranks == (3, 7)
    single = ParallelState.single()
    assert (single.ep_size, single.ep_rank, single.expert_dp_size) == (1, 0, 1)


def test_expert_parallel_size_not_dividing_dp_is_a_clear_error():
    with pytest.raises(MegaliteError, match=r"--expert-model-parallel-size 3 does not divide "
                                            r"the data-parallel size 4"):
        rank_layout(8, 2, 1, expert_model_parallel_size=3)
    with pytest.raises(MegaliteError, match="--expert-model-parallel-size must be a positive"):
        rank_layout(8, 1, 1, expert_model_parallel_size=0)
