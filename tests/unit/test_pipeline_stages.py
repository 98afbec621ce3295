"""Layer split, model chunks and schedule orders, without processes.

The schedule checks replay every rank's step list in two simulated pipelines: gloo's semantics
(sends complete on their own, receives wait) and a model of NCCL's (operations with one peer in
order on one stream, a send blocks until received, a send grouped with the next receive as the
executor does). Both must finish (no deadlock); each message must be received exactly once, in
the order it was sent on its link (what NCCL's tag-less matching needs); every (chunk,
microbatch) runs F then B once.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from megalite.distributed.parallel_state import ParallelState, rank_layout
from megalite.errors import MegaliteError
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext
from megalite.parallel.pipeline import (build_model_chunks, forward_backward, layer_ranges,
                                       schedule_order, schedule_steps)
from megalite.training.loss import GPTLoss


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
        chunks = build_model_chunks(cfg, ModelContext(ps, device="meta"), vp_size=2)
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
    (chunk,) = build_model_chunks(cfg, ModelContext(ParallelState.single(), device="meta"))
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
def programs(pp, vp, m, forward_only=False):
    """Each rank's exchange steps (schedule_steps), each a list of ``(step, need, produce)``:
    the message a step needs first and the one it produces, as ``(src, dst, kind, lower
    virtual stage, mb)``."""
    nv = pp * vp
    out = []
    for r in range(pp):
        prog = []
        for group in schedule_steps(pp, r, vp, m, forward_only):
            items = []
            for kind, c, mb in group:
                v = c * pp + r
                if kind == "F":
                    need = None if v == 0 else ((r - 1) % pp, r, "act", v - 1, mb)
                    make = None if v == nv - 1 else (r, (r + 1) % pp, "act", v, mb)
                else:
                    need = None if v == nv - 1 else ((r + 1) % pp, r, "grad", v, mb)
                    make = None if v == 0 else (r, (r - 1) % pp, "grad", v - 1, mb)
                items.append(((kind, c, mb), need, make))
            prog.append(items)
        out.append(prog)
    return out


def simulate_async(progs):
    """gloo model: sends complete on their own, a step waits for the message it needs."""
    progs = [[item for group in prog for item in group] for prog in progs]
    pp = len(progs)
    pos, posted, sent, received = [0] * pp, set(), {}, {}
    while any(pos[r] < len(progs[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if pos[r] == len(progs[r]):
                continue
            _, need, make = progs[r][pos[r]]
            if need is not None:
                if need not in posted:
                    continue                       # blocked on a receive
                posted.remove(need)
                received.setdefault(need[:2], []).append(need)
            if make is not None:
                posted.add(make)
                sent.setdefault(make[:2], []).append(make)
            pos[r] += 1
            progressed = True
        assert progressed, f"deadlock at steps {pos}"
    assert not posted, "messages sent but never received"
    return sent, received


def simulate_streams(progs):
    """NCCL model of the executor. Before each exchange step its receives are grouped with the
    previous step's sends (the sends go alone, right away, when the step receives nothing); a
    group is enqueued once the earlier steps are computed; the operations with one peer run in
    enqueue order (one stream per rank pair) and are matched in order (no tags); a group holds
    its streams until all of its operations matched; a step computes once its group is done.
    """
    pp = len(progs)
    groups = []          # dicts: rank, after, ops [(dir, msg)], matched set, streams
    queues = [dict() for _ in range(pp)]
    feeds = [dict() for _ in range(pp)]     # exchange step -> group holding its receives
    for r, prog in enumerate(progs):
        pending = []
        for i, group in enumerate(prog + [[]]):
            needs = [need for _, need, _ in group if need]
            ops = [("S", msg) for msg in pending] + [("R", msg) for msg in needs]
            if ops:
                g = {"rank": r, "after": i, "ops": ops, "matched": set(),
                     "streams": {frozenset(msg[:2]) for _, msg in ops}}
                groups.append(g)
                for key in g["streams"]:
                    queues[r].setdefault(key, []).append(g)
                if needs:
                    feeds[r][i] = g
            pending = [make for _, _, make in group if make]
    done = [0] * pp
    finished = set()

    def active(g):
        r = g["rank"]
        return done[r] >= g["after"] and all(queues[r][k][0] is g for k in g["streams"])

    def first_unmatched(g, d, link):
        return next((j for j, (dd, msg) in enumerate(g["ops"])
                     if dd == d and msg[:2] == link and j not in g["matched"]), None)

    while any(done[r] < len(progs[r]) for r in range(pp)) or len(finished) < len(groups):
        progressed = False
        for r in range(pp):
            k = done[r]
            if k < len(progs[r]) and (k not in feeds[r] or id(feeds[r][k]) in finished):
                done[r] += 1
                progressed = True
        live = [g for g in groups if id(g) not in finished and active(g)]
        for g in live:
            for link in {msg[:2] for d, msg in g["ops"] if d == "S"}:
                j = first_unmatched(g, "S", link)
                h = next((h for h in live if h["rank"] == link[1]
                          and first_unmatched(h, "R", link) is not None), None)
                if j is None or h is None:
                    continue
                jj = first_unmatched(h, "R", link)
                assert h["ops"][jj][1] == g["ops"][j][1], \
                    f"out of order on {link}: {g['ops'][j][1]} meets {h['ops'][jj][1]}"
                g["matched"].add(j)
                h["matched"].add(jj)
                progressed = True
        for g in live:
            if len(g["matched"]) == len(g["ops"]):
                finished.add(id(g))
                for key in g["streams"]:
                    queues[g["rank"]][key].pop(0)
                progressed = True
        assert progressed, f"deadlock under the stream model at steps {done}"


LAYOUTS = [(1, 1, 3), (2, 1, 1), (2, 1, 5), (4, 1, 2), (4, 1, 9), (3, 1, 7),
           (2, 2, 2), (2, 2, 4), (2, 3, 6), (4, 2, 4), (4, 2, 8), (3, 2, 9), (4, 4, 12)]


@pytest.mark.parametrize("pp, vp, m", LAYOUTS)
@pytest.mark.parametrize("forward_only", [False, True])
def test_schedule_runs_without_deadlock_in_link_order(pp, vp, m, forward_only):
    progs = programs(pp, vp, m, forward_only)
    sent, received = simulate_async(progs)
    for link in sent:   # received in the order sent on every (src, dst) link, all kinds mixed
        assert received[link] == sent[link], link
    simulate_streams(progs)
    for r, prog in enumerate(progs):
        order = [step for group in prog for step, _, _ in group]
        assert order == schedule_order(pp, r, vp, m, forward_only)
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


def test_stream_model_catches_a_send_send_cycle():
    # Two neighbours that each send to the other before receiving: fine with asynchronous
    # sends, a deadlock under the stream model (the interleaved schedule with one exchange per
    # forward and per backward ran into exactly this).
    progs = [[[(("F", 0, 0), None, (0, 1, "act", 0, 0))], [(("X", 0, 0), None, None)],
              [(("B", 0, 0), (1, 0, "grad", 0, 0), None)]],
             [[(("F", 0, 0), None, (1, 0, "grad", 0, 0))], [(("X", 0, 0), None, None)],
              [(("B", 0, 0), (0, 1, "act", 0, 0), None)]]]
    simulate_async(progs)
    with pytest.raises(AssertionError, match="deadlock under the stream model"):
        simulate_streams(progs)


def test_one_exchange_per_step_would_deadlock_interleaved_on_nccl():
    # The reason steady-state forward/backward pairs share one exchange: split them and the
    # stream model deadlocks for pp=2, vp=2.
    split = [[[item] for group in prog for item in group] for prog in programs(2, 2, 4)]
    simulate_async(split)
    with pytest.raises(AssertionError, match="deadlock under the stream model"):
        simulate_streams(split)


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


# -- no pipelining (pp = 1) in this process ----------------------------------------------------
def _tiny_llama():
    cfg = get_preset("tiny-llama").replace(vocab_size=96, max_position_embeddings=8, seq_length=8)
    g = torch.Generator().manual_seed(3)
    mbs = []
    for _ in range(3):
        ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
        mbs.append({"tokens": ids[:, :-1], "labels": ids[:, 1:]})
    return cfg, mbs


def test_no_pipelining_accumulates_exactly_the_mean_gradient():
    # Gradient accumulation over 3 microbatches vs one backward of the mean over the same 3:
    # the same products summed in the same order up to autograd's accumulation, so 1e-6 of
    # each tensor's scale (float32).
    cfg, mbs = _tiny_llama()
    ps = ParallelState.single()
    (chunk,) = build_model_chunks(cfg, ModelContext(ps))
    chunk.init_weights(5)
    ref = GPTModel(cfg, ModelContext(ps))
    ref.init_weights(5)
    calls = []

    def backward_fn(out, grad):
        calls.append((out.detach().clone(), grad))
        torch.autograd.backward(out, grad)

    losses = forward_backward([chunk], iter(mbs), 3, ps, GPTLoss(3, loss_scale=4.0),
                              seq_length=8, micro_batch_size=2, dtype=torch.float32,
                              backward_fn=backward_fn)
    ref_losses = [ref(mb["tokens"], labels=mb["labels"]).mean() for mb in mbs]
    (torch.stack(ref_losses).mean() * 4.0).backward()
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses).detach(),
                               rtol=1e-6, atol=0)
    # the last stage backpropagates loss * loss_scale / num_microbatches, with grad None
    assert [g for _, g in calls] == [None] * 3
    torch.testing.assert_close(torch.stack([o for o, _ in calls]),
                               torch.stack(ref_losses).detach() * 4.0 / 3, rtol=1e-6, atol=0)
    for (n, p), q in zip(chunk.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max()
        assert scale > 0 and (p.grad - q.grad).abs().max() <= 1e-6 * scale, n


def test_forward_only_keeps_no_graph_and_misuse_is_clear():
    cfg, mbs = _tiny_llama()
    ps = ParallelState.single()
    chunks = build_model_chunks(cfg, ModelContext(ps))
    chunks[0].init_weights(5)
    losses = forward_backward(chunks, iter(mbs), 3, ps, GPTLoss(3), seq_length=8,
                              micro_batch_size=2, dtype=torch.float32, forward_only=True)
    assert len(losses) == 3 and not any(l.requires_grad for l in losses)
    assert all(p.grad is None for p in chunks[0].parameters())
    with pytest.raises(MegaliteError, match="iterator ended after 3 microbatches; 4 were"):
        forward_backward(chunks, iter(mbs), 4, ps, GPTLoss(4), seq_length=8, micro_batch_size=2,
                         dtype=torch.float32, forward_only=True)
    with pytest.raises(MegaliteError, match="need --pipeline-model-parallel-size > 1"):
        forward_backward(chunks * 2, iter(mbs), 3, ps, GPTLoss(3), seq_length=8,
                         micro_batch_size=2, dtype=torch.float32)
