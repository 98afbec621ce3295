"""Layer split, model chunks and schedule orders, without processes.

The schedule checks replay every rank's step list in a simulated pipeline with the executor's
semantics (sends complete on their own, receives wait) and require that it finishes (no
deadlock), that each message is received exactly once, in the order it was sent on its link
(what NCCL's tag-less matching needs), and that every (chunk, microbatch) runs F then B once.
"""
from __future__ import annotations

import itertools

import pytest

from megalite.distributed.parallel_state import ParallelState, rank_layout
from megalite.errors import MegaliteError
from megalite.model import get_preset
from megalite.parallel.pipeline import build_model_chunks, layer_ranges, schedule_order


# -- layer_ranges ------------------------------------------------------------------------------
def test_even_split_by_hand():
    assert layer_ranges(8, 1) == [[(0, 8)]]
    assert layer_ranges(8, 4) == [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 8)]]


def test_interleaved_split_is_megatron_order():
    # virtual stage v = chunk * pp + rank holds the v-th block
    assert layer_ranges(8, 2, 2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    assert layer_ranges(12, 3, 2) == [[(0, 2), (6, 8)], [(2, 4), (8, 10)], [(4, 6), (10, 12)]]


def test_explicit_uneven_split():
    assert layer_ranges(14, 4, split=[3, 4, 4, 3]) == [[(0, 3)], [(3, 7)], [(7, 11)], [(11, 14)]]
    assert layer_ranges(4, 3, split=[0, 4, 0]) == [[(0, 0)], [(0, 4)], [(4, 4)]]


@pytest.mark.parametrize("args, match", [
    ((7, 2), r"--num-layers 7 is not divisible by --pipeline-model-parallel-size 2.*"
             r"--pipeline-layer-split"),
    ((8, 2, 3), r"--num-layers 8 is not divisible by .*3 virtual stages"),
    ((8, 1, 2), r"needs --pipeline-model-parallel-size > 1"),
    ((8, 2, 1, [3, 4]), r"sums to 7, but --num-layers is 8"),
    ((8, 2, 1, [8]), r"has 1 entries; --pipeline-model-parallel-size is 2"),
    ((8, 2, 1, [9, -1]), r"integer >= 0"),
    ((8, 2, 2, [4, 4]), r"cannot be combined with --num-layers-per-virtual"),
    ((0, 2), r"--num-layers must be a positive integer"),
])
def test_bad_splits_are_clear_errors(args, match):
    with pytest.raises(MegaliteError, match=match):
        layer_ranges(*args)


@pytest.mark.parametrize("layers, pp, vp", [(8, 2, 2), (12, 3, 2), (8, 4, 1), (6, 3, 1)])
def test_ranges_cover_every_layer_once(layers, pp, vp):
    ranges = layer_ranges(layers, pp, vp)
    covered = sorted(i for rank in ranges for a, b in rank for i in range(a, b))
    assert covered == list(range(layers))
    assert all(len(rank) == vp for rank in ranges)


# -- build_model_chunks ------------------------------------------------------------------------
def test_chunks_hold_the_right_parts():
    cfg = get_preset("tiny").replace(num_layers=8)
    seen = []
    for rank in range(2):
        ps = ParallelState.for_shapes(1, 0, pp_size=2, pp_rank=rank)
        chunks = build_model_chunks(cfg, ps, vp_size=2, device="meta")
        for c, chunk in enumerate(chunks):
            names = {n.split(".")[0] for n, _ in chunk.named_parameters()}
            assert ("embedding" in names) == (rank == 0 and c == 0)
            assert ("final_norm" in names) == (rank == 1 and c == 1)
            # tied embedding: the last chunk holds the output-layer copy, marked shared
            assert ("output_layer" in names) == (rank == 1 and c == 1)
            if "output_layer" in names:
                assert chunk.output_layer.weight.shared_embedding
            seen += [int(k) for k in chunk.layers.keys()]
    assert sorted(seen) == list(range(8))


def test_single_stage_keeps_the_whole_model():
    cfg = get_preset("tiny-llama")
    (chunk,) = build_model_chunks(cfg, ParallelState.single(), device="meta")
    assert chunk.pre_process and chunk.post_process and len(chunk.layers) == cfg.num_layers


# -- embedding group layout --------------------------------------------------------------------
def test_embedding_groups_by_hand():
    assert rank_layout(8, 1, 4).embedding_groups == ((0, 6), (1, 7))
    assert rank_layout(8, 2, 2).embedding_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert rank_layout(8, 2, 1).embedding_groups == ()
    lay = rank_layout(16, 2, 4)
    for t, d in itertools.product(range(2), range(2)):
        assert (lay.rank_of(t, d, 0), lay.rank_of(t, d, 3)) in lay.embedding_groups
    ps = ParallelState.for_shapes(2, 1, pp_size=4, pp_rank=2, dp_size=2)
    assert ps.embedding_ranks == (1, 13) and ps.embedding_group is None
    assert ParallelState.for_shapes(2, 1).embedding_ranks is None


# -- schedules ---------------------------------------------------------------------------------
def simulate(pp, vp, m, forward_only=False):
    """Run every rank's order with async sends / blocking receives; return per-link logs."""
    orders = [schedule_order(pp, r, vp, m, forward_only) for r in range(pp)]
    nv = pp * vp
    pos = [0] * pp
    in_flight: dict[tuple, list] = {}          # (src, dst) -> messages not yet received
    sent_log: dict[tuple, list] = {}
    recv_log: dict[tuple, list] = {}

    def send(src, dst, msg):
        in_flight.setdefault((src, dst), []).append(msg)
        sent_log.setdefault((src, dst), []).append(msg)

    while any(pos[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if pos[r] == len(orders[r]):
                continue
            kind, c, mb = orders[r][pos[r]]
            v = c * pp + r
            if kind == "F":
                need = None if v == 0 else ((r - 1) % pp, r, ("act", v - 1, mb))
            else:
                need = None if v == nv - 1 else ((r + 1) % pp, r, ("grad", v, mb))
            if need is not None:
                queue = in_flight.get(need[:2], [])
                if need[2] not in queue:
                    continue                       # blocked on a receive
                queue.remove(need[2])
                recv_log.setdefault(need[:2], []).append(need[2])
            if kind == "F" and v < nv - 1:
                send(r, (r + 1) % pp, ("act", v, mb))
            if kind == "B" and v > 0:
                send(r, (r - 1) % pp, ("grad", v - 1, mb))
            pos[r] += 1
            progressed = True
        assert progressed, f"deadlock: pp={pp} vp={vp} m={m} at {pos}"
    assert all(not q for q in in_flight.values()), "messages sent but never received"
    return orders, sent_log, recv_log


LAYOUTS = [(1, 1, 3), (2, 1, 1), (2, 1, 5), (4, 1, 2), (4, 1, 9), (3, 1, 7),
           (2, 2, 2), (2, 2, 4), (2, 3, 6), (4, 2, 4), (4, 2, 8), (3, 2, 9), (4, 4, 12)]


@pytest.mark.parametrize("pp, vp, m", LAYOUTS)
@pytest.mark.parametrize("forward_only", [False, True])
def test_schedule_runs_without_deadlock_in_link_order(pp, vp, m, forward_only):
    orders, sent, received = simulate(pp, vp, m, forward_only)
    for link in sent:   # received in the order sent on every (src, dst) link, all kinds mixed
        assert received[link] == sent[link], link
    for r, order in enumerate(orders):
        fwd = [(c, mb) for k, c, mb in order if k == "F"]
        bwd = [(c, mb) for k, c, mb in order if k == "B"]
        everything = sorted(itertools.product(range(vp), range(m)))
        assert sorted(fwd) == everything
        assert sorted(bwd) == ([] if forward_only else everything)
        for c, mb in bwd:
            assert order.index(("F", c, mb)) < order.index(("B", c, mb))
        # each chunk sees its microbatches in order (gradients accumulate in the same order as
        # in the single-process loop)
        for c in range(vp):
            assert [x for cc, x in fwd if cc == c] == list(range(m))
            assert [x for cc, x in bwd if cc == c] == ([] if forward_only else list(range(m)))


def test_1f1b_limits_live_activations():
    # at most pp - rank microbatches are between their F and B on stage `rank`
    pp, m = 4, 10
    for r in range(pp):
        live = peak = 0
        for kind, _, _ in schedule_order(pp, r, 1, m):
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        assert peak == pp - r


def test_no_pipelining_alternates():
    assert schedule_order(1, 0, 1, 3) == [("F", 0, 0), ("B", 0, 0), ("F", 0, 1), ("B", 0, 1),
                                          ("F", 0, 2), ("B", 0, 2)]


def test_interleaved_needs_multiple_of_pp_microbatches():
    with pytest.raises(MegaliteError, match=r"number of microbatches \(3 = global batch.*"
                                            r"multiple of --pipeline-model-parallel-size 2"):
        schedule_order(2, 0, 2, 3)
    with pytest.raises(MegaliteError, match="microbatches must be >= 1"):
        schedule_order(2, 0, 1, 0)
