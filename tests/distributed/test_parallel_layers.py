"""Tensor-parallel building blocks in real gloo process groups, against plain torch.

One group of 4 processes is shared by every test here (spawning costs ~5-10 s on 2 cores); TP=2
runs in it as tp 2 x dp 2, so both data-parallel replicas check the same thing.

Tolerances. Most checks run in float64: a TP layer computes the same dot products as the plain
layer, only summed in a different order (a row-parallel layer adds 2 or 4 partial sums; BLAS
blocks differently for smaller matrices), so the difference is rounding, ~1e-15 relative in
float64; ``REL64 = 1e-12`` leaves headroom while any wrong shard, missing reduction or wrong
scale shows up as an O(1) error. One case repeats the layer stack in float32 with the issue's
1e-5 (fp32 eps is 1.2e-7; reductions over 16-32 terms plus a reordered 4-way sum stay within a
few 1e-7). Sharding/initialization and RNG checks are exact (bitwise): they move the same bits.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness import DistributedTestError, DistributedWorkers

from megalite.distributed.parallel_state import (
    ParallelState, init_distributed, rank_layout)
from megalite.errors import MegaliteError
from megalite.parallel import comm
from megalite.parallel.context import ModelContext
from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.layers import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
    parallel_lm_logits)
from megalite.parallel.random import checkpoint, model_parallel_seed
from megalite.parallel.sharding import (
    gather_full_tensor, init_parameter_, set_sharding, shard_tensor)

REL64 = 1e-12
REL32 = 1e-5
WORLD = 4


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(WORLD, timeout=180) as w:
        yield w


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_all_within(results: list[dict], tol: float) -> None:
    bad = {(r, k): v for r, res in enumerate(results) for k, v in res.items() if not v <= tol}
    assert not bad, f"errors above {tol} (rank, quantity) -> relative error: {bad}"


def _randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


# ----------------------------------------------------------------------------------- layout
def check_layouts():
    """Real groups for every layout of world 4 agree with the pure rank_layout."""
    rank = dist.get_rank()
    for tp, pp in [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)]:
        ps = ParallelState.build(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        lay = rank_layout(WORLD, tp, pp)
        assert (ps.tp_rank, ps.dp_rank, ps.pp_rank) == lay.coordinates(rank)
        assert (ps.tp_size, ps.pp_size, ps.dp_size) == (tp, pp, WORLD // (tp * pp))
        for group, ranks, my in [(ps.tp_group, ps.tp_group_ranks, ps.tp_rank),
                                 (ps.dp_group, ps.dp_group_ranks, ps.dp_rank),
                                 (ps.pp_group, ps.pp_group_ranks, ps.pp_rank),
                                 (ps.mp_group, ps.mp_group_ranks, None)]:
            # Who is really in the group, in group-rank order?
            members = [torch.zeros(1, dtype=torch.long) for _ in range(len(ranks))]
            dist.all_gather(members, torch.tensor([rank]), group=group)
            assert tuple(int(m) for m in members) == ranks, (tp, pp, members, ranks)
            if my is not None:
                assert ranks[my] == rank
    import copy  # a model holding real groups can be deep-copied (EMA, tests); the state is shared
    col = ColumnParallelLinear(4, 8, ModelContext(ps))
    assert copy.deepcopy(col).ps is ps
    try:
        ParallelState.build(tensor_model_parallel_size=3)
    except MegaliteError as e:
        assert "world size 4 is not divisible" in str(e) and "3" in str(e)
    else:
        raise AssertionError("tp=3 in world 4 was accepted")
    return True


def test_parallel_state_groups_match_layout(workers):
    assert workers.run(check_layouts) == [True] * WORLD


# ------------------------------------------------------------------------------------ comm
def check_comm(tp):
    """Each autograd collective's forward and backward against its definition."""
    ps = ParallelState.build(tp)
    r = ps.tp_rank

    def per_rank(seed, *shape):  # every rank can compute every rank's tensor
        return [_randn(torch.Generator().manual_seed(seed * 100 + k), *shape) for k in range(tp)]

    def run(fn, x, g):
        x = x.clone().requires_grad_()
        y = fn(x)
        y.backward(g)
        return y.detach(), x.grad

    s, b, h = 4 * tp, 3, 2 * tp
    xs, gs = per_rank(1, s, b, h), per_rank(2, s, b, h)
    X = per_rank(3, s, b, h)[0]  # a replicated input
    small_x, small_g = per_rank(4, s, b, 2), per_rank(5, s, b, 2)
    seq_x, seq_g = per_rank(6, 4, b, h), per_rank(7, 4, b, h)
    errs = {}

    def cmp(name, got, want):
        errs[name + ".fwd"] = rel(got[0], want[0])
        errs[name + ".bwd"] = rel(got[1], want[1])

    cmp("copy", run(lambda x: comm.copy_to_tp_region(x, ps), xs[r], gs[r]), (xs[r], sum(gs)))
    cmp("reduce", run(lambda x: comm.reduce_from_tp_region(x, ps), xs[r], gs[r]),
        (sum(xs), gs[r]))
    gh = [g[..., :2] for g in gs]
    cmp("scatter", run(lambda x: comm.scatter_to_tp_region(x, ps), X, gh[r]),
        (X.chunk(tp, -1)[r], torch.cat(gh, -1)))
    for dim in (-1, 1, 0):  # 0 and the others take different collective paths
        cmp(f"gather{dim}", run(lambda x: comm.gather_from_tp_region(x, ps, dim), small_x[r],
                                torch.cat(small_g, dim)),
            (torch.cat(small_x, dim), small_g[r]))
    gq = [g[:4] for g in gs]
    cmp("sp_scatter", run(lambda x: comm.scatter_to_sequence_parallel_region(x, ps), X, gq[r]),
        (X.chunk(tp, 0)[r], torch.cat(gq, 0)))
    cmp("sp_gather", run(lambda x: comm.gather_from_sequence_parallel_region(x, ps), seq_x[r],
                         gs[r]),
        (torch.cat(seq_x, 0), sum(gs).chunk(tp, 0)[r]))
    cmp("sp_reduce_scatter",
        run(lambda x: comm.reduce_scatter_to_sequence_parallel_region(x, ps), xs[r], seq_g[r]),
        (sum(xs).chunk(tp, 0)[r], torch.cat(seq_g, 0)))

    # The fallback for gloo builds without reduce-scatter (all-reduce, keep own chunk).
    def no_reduce_scatter(*a, **k):
        raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")
    real, comm._reduce_scatter_single = comm._reduce_scatter_single, no_reduce_scatter
    try:
        errs["sp_reduce_scatter.fallback"] = rel(comm.reduce_scatter(xs[r], ps),
                                                 sum(xs).chunk(tp, 0)[r])
    finally:
        comm._reduce_scatter_single = real
    return errs


@pytest.mark.parametrize("tp", [2, 4])
def test_comm_functions_forward_and_backward(workers, tp):
    assert_all_within(workers.run(check_comm, tp), REL64)


# ---------------------------------------------------------------------------------- layers
def check_linear_stack(tp, sp, dtype_name):
    """Column -> GELU -> Row (the MLP shape) vs nn.Linear: output, input grad, all weight grads."""
    dtype = getattr(torch, dtype_name)
    ps = ParallelState.build(tp)
    g = torch.Generator().manual_seed(1234)
    s, b, h, f = 8, 2, 16, 32
    x_full, gy = _randn(g, s, b, h, dtype=dtype), _randn(g, s, b, h, dtype=dtype)
    ref1, ref2 = nn.Linear(h, f, dtype=dtype), nn.Linear(f, h, dtype=dtype)
    col = ColumnParallelLinear(h, f, ModelContext(ps, dtype=dtype), sequence_parallel=sp)
    row = RowParallelLinear(f, h, ModelContext(ps, dtype=dtype), sequence_parallel=sp)
    with torch.no_grad():
        for ref, mine in ((ref1, col), (ref2, row)):
            for name in ("weight", "bias"):
                full = _randn(g, *getattr(ref, name).shape, dtype=dtype)
                getattr(ref, name).copy_(full)
                p = getattr(mine, name)
                p.copy_(shard_tensor(full, p.tensor_parallel_dim, p.partition_stride,
                                     ps.tp_rank, tp))
    xr = x_full.clone().requires_grad_()
    yr = ref2(F.gelu(ref1(xr)))
    yr.backward(gy)

    local = (lambda t: t.chunk(tp, 0)[ps.tp_rank]) if sp else (lambda t: t)
    x = local(x_full).clone().requires_grad_()
    y = row(F.gelu(col(x)))
    y.backward(local(gy))
    errs = {}
    if sp and tp > 1:
        # Negative control: before the SP all-reduce the row bias grad is only a partial sum.
        errs["bias_partial_differs"] = 0.0 if rel(row.bias.grad, ref2.bias.grad) > 1e-3 else 1.0
    from megalite.parallel.grad_sync import allreduce_sequence_parallel_grads
    allreduce_sequence_parallel_grads(nn.ModuleList([col, row]).parameters(), ps)
    whole = (lambda t: comm.all_gather(t, 0, ps)) if sp else (lambda t: t)
    errs["out"] = rel(whole(y), yr)
    errs["dx"] = rel(whole(x.grad), xr.grad)
    for ref, mine, tag in ((ref1, col, "col"), (ref2, row, "row")):
        for name in ("weight", "bias"):
            p = getattr(mine, name)
            errs[f"{tag}.{name}.grad"] = rel(gather_full_tensor(p.grad, p, ps),
                                             getattr(ref, name).grad)
    assert (col.weight.shape, row.weight.shape) == ((f // tp, h), (h, f // tp))
    return errs


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_column_row_parallel_linear_float64(workers, tp, sp):
    assert_all_within(workers.run(check_linear_stack, tp, sp, "float64"), REL64)


def test_column_row_parallel_linear_float32_tp4_sp(workers):
    assert_all_within(workers.run(check_linear_stack, 4, True, "float32"), REL32)


def check_linear_variants(tp):
    """gather_output / input_is_parallel=False, and a fused [gate; up] weight (stride 2, SwiGLU)."""
    ps = ParallelState.build(tp)
    g = torch.Generator().manual_seed(99)
    s, b, h, f = 4, 2, 8, 16
    x_full, gy = _randn(g, s, b, h), _randn(g, s, b, h)
    w_gu, w_down = _randn(g, 2 * f, h), _randn(g, h, f)
    errs = {}

    # (a) column with gather_output -> row that splits its own input.
    ctx = ModelContext(ps, dtype=torch.float64)
    col = ColumnParallelLinear(h, f, ctx, bias=False, gather_output=True)
    row = RowParallelLinear(f, h, ctx, bias=False, input_is_parallel=False)
    with torch.no_grad():
        col.weight.copy_(shard_tensor(w_gu[:f], 0, 1, ps.tp_rank, tp))
        row.weight.copy_(shard_tensor(w_down, 1, 1, ps.tp_rank, tp))
    xr = x_full.clone().requires_grad_()
    mid_r = F.linear(xr, w_gu[:f])
    yr = F.linear(torch.tanh(mid_r), w_down)
    yr.backward(gy)
    x = x_full.clone().requires_grad_()
    mid = col(x)
    y = row(torch.tanh(mid))
    y.backward(gy)
    errs["gathered_mid"] = rel(mid, mid_r)
    errs["a.out"], errs["a.dx"] = rel(y, yr), rel(x.grad, xr.grad)

    # (b) fused gate/up with partition_stride=2: the local output is [gate_r; up_r].
    fused = ColumnParallelLinear(h, 2 * f, ctx, bias=False, partition_stride=2)
    down = RowParallelLinear(f, h, ctx, bias=False)
    with torch.no_grad():
        fused.weight.copy_(shard_tensor(w_gu, 0, 2, ps.tp_rank, tp))
        down.weight.copy_(shard_tensor(w_down, 1, 1, ps.tp_rank, tp))
    wr = w_gu.clone().requires_grad_()
    xr = x_full.clone().requires_grad_()
    gate_r, up_r = F.linear(xr, wr).chunk(2, -1)
    yr = F.linear(F.silu(gate_r) * up_r, w_down)
    yr.backward(gy)
    x = x_full.clone().requires_grad_()
    gate, up = fused(x).chunk(2, -1)
    y = down(F.silu(gate) * up)
    y.backward(gy)
    errs["b.out"], errs["b.dx"] = rel(y, yr), rel(x.grad, xr.grad)
    errs["b.w.grad"] = rel(gather_full_tensor(fused.weight.grad, fused.weight, ps), wr.grad)
    return errs


@pytest.mark.parametrize("tp", [2, 4])
def test_linear_gather_output_and_fused_stride(workers, tp):
    assert_all_within(workers.run(check_linear_variants, tp), REL64)


def check_embedding_and_loss(tp, sp):
    """VocabParallelEmbedding -> (SP scatter) -> tied parallel logits -> vocab-parallel CE,
    vs nn.Embedding + F.linear + F.cross_entropy: loss, hidden grad, embedding grad."""
    ps = ParallelState.build(tp)
    g = torch.Generator().manual_seed(7)
    V, h, b, s = 64, 8, 2, 8
    ids = torch.randint(0, V, (b, s), generator=g)
    ids[0, :4] = torch.tensor([0, V // tp - 1, V // tp, V - 1])  # slice edges of every layout
    target = torch.randint(0, V, (s, b), generator=g)
    target[:, 0] = torch.arange(s) * (V // s)  # targets in every rank's slice
    w = _randn(g, V, h)

    ref = nn.Embedding(V, h, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(w)
    hr = ref(ids).transpose(0, 1)  # [s, b, h]
    lossr = F.cross_entropy(F.linear(torch.tanh(hr), ref.weight).reshape(-1, V),
                            target.reshape(-1), reduction="none").view(s, b)
    lossr.sum().backward()

    emb = VocabParallelEmbedding(V, h, ModelContext(ps, dtype=torch.float64))
    with torch.no_grad():
        emb.weight.copy_(shard_tensor(w, 0, 1, ps.tp_rank, tp))
    hid = emb(ids).transpose(0, 1)
    if sp:
        hid = comm.scatter_to_sequence_parallel_region(hid, ps)
    logits = parallel_lm_logits(torch.tanh(hid), emb.weight, ps, sequence_parallel=sp)
    assert logits.shape == (s, b, V // tp)
    loss = vocab_parallel_cross_entropy(logits, target, ps)
    loss.sum().backward()
    return {"emb.out": rel(emb(ids), ref(ids)), "loss": rel(loss, lossr),
            "emb.grad": rel(gather_full_tensor(emb.weight.grad, emb.weight, ps), ref.weight.grad)}


@pytest.mark.parametrize("tp,sp", [(2, False), (4, False), (4, True)])
def test_vocab_parallel_embedding_and_tied_loss(workers, tp, sp):
    assert_all_within(workers.run(check_embedding_and_loss, tp, sp), REL64)


def check_cross_entropy(tp, dtype_name):
    """Loss and logits gradient vs F.cross_entropy, with targets in every rank's slice."""
    dtype = getattr(torch, dtype_name)
    ps = ParallelState.build(tp)
    g = torch.Generator().manual_seed(3)
    n, V = 6 * tp, 32 * tp
    full = (_randn(g, n, V) * 5).to(dtype)  # large logits exercise the max subtraction
    target = torch.randint(0, V, (n,), generator=g)
    target[: 2 * tp] = torch.tensor([k * (V // tp) + e for k in range(tp) for e in (0, V // tp - 1)])
    upstream = _randn(g, n).to(dtype)
    fr = full.clone().requires_grad_()
    lr = F.cross_entropy(fr.double(), target, reduction="none")
    (lr * upstream.double()).sum().backward()
    x = full.chunk(tp, -1)[ps.tp_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, ps)
    (loss * upstream).sum().backward()
    assert x.grad.dtype == dtype
    return {"loss": rel(loss, lr), "grad": rel(x.grad, fr.grad.chunk(tp, -1)[ps.tp_rank])}


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy(workers, tp):
    assert_all_within(workers.run(check_cross_entropy, tp, "float64"), REL64)
    # fp32 logits: the fp32 math of the loss itself differs from an fp64 reference by ~1e-7.
    assert_all_within(workers.run(check_cross_entropy, tp, "float32"), REL32)


# ------------------------------------------------------------------------------ RNG, recompute
def check_rng(tp):
    """Dropout masks of the model-parallel stream and of the default stream, twice from --seed."""
    ps = ParallelState.build(tp)
    x = torch.ones(4096)
    out = []
    for _ in range(2):  # the same seed must reproduce the same masks
        tracker = model_parallel_seed(1234, ps)
        with tracker.fork():
            split_mask = F.dropout(x, 0.5) != 0
        replicated_mask = F.dropout(x, 0.5) != 0
        out.append((split_mask, replicated_mask))
    # fork() leaves the default stream where it was.
    torch.manual_seed(5)
    a = torch.rand(8)
    torch.manual_seed(5)
    with tracker.fork():
        torch.rand(8)
    b = torch.rand(8)
    return ps.tp_rank, out, torch.equal(a, b)


@pytest.mark.parametrize("tp", [2, 4])
def test_rng_tracker_masks_differ_across_tp_and_agree_elsewhere(workers, tp):
    res = workers.run(check_rng, tp)
    for tp_rank, ((split, repl), (split2, repl2)), untouched in res:
        assert untouched, "fork() disturbed the default generator"
        assert torch.equal(split, split2) and torch.equal(repl, repl2), "not reproducible"
    repl0 = res[0][1][0][1]
    assert all(torch.equal(r[1][0][1], repl0) for r in res), "default-stream masks differ"
    for i, (ti, (a, _), _) in enumerate([(r[0], r[1][0], r[2]) for r in res]):
        for j, (tj, (c, _), _) in enumerate([(r[0], r[1][0], r[2]) for r in res]):
            if i < j:
                same = torch.equal(a, c)
                # equal exactly when the two ranks hold the same TP shard (different DP replicas)
                assert same == (ti == tj), (i, j, ti, tj, same)


def _block(col, row, tracker, p):
    def f(x):
        hdn = F.gelu(col(x))
        with tracker.fork():  # hdn is split over TP: per-rank masks
            hdn = F.dropout(hdn, p)
        y = row(hdn)
        return F.dropout(y, p)  # replicated (or, with SP, this rank's sequence shard)
    return f


def check_checkpoint(tp, sp):
    """Recompute with dropout gives bitwise the gradients of no recompute; without replaying the
    tracker it does not (negative control)."""
    ps = ParallelState.build(tp)
    s, b, h, f = 8, 2, 8, 16
    torch.manual_seed(0)
    col = ColumnParallelLinear(h, f, ModelContext(ps, dtype=torch.float64), sequence_parallel=sp)
    row = RowParallelLinear(f, h, ModelContext(ps, dtype=torch.float64), sequence_parallel=sp)
    x0 = _randn(torch.Generator().manual_seed(1), s // tp if sp else s, b, h)

    def grads(mode):
        tracker = model_parallel_seed(77, ps)
        for p in (*col.parameters(), *row.parameters()):
            p.grad = None
        x = x0.clone().requires_grad_()
        fn = _block(col, row, tracker, 0.3)
        if mode == "plain":
            y = fn(x)
        else:
            y = checkpoint(fn, tracker if mode == "replay" else None, x)
        y.square().sum().backward()
        return [x.grad] + [p.grad for p in (*col.parameters(), *row.parameters())]

    plain, replay, no_replay = grads("plain"), grads("replay"), grads("no-replay")
    return (all(torch.equal(a, c) for a, c in zip(plain, replay)),
            any(not torch.equal(a, c) for a, c in zip(plain, no_replay)))


@pytest.mark.parametrize("tp,sp", [(2, True), (4, False)])
def test_checkpoint_keeps_gradients_with_dropout(workers, tp, sp):
    for same, control_differs in workers.run(check_checkpoint, tp, sp):
        assert same, "recomputed gradients differ from the plain ones"
        assert control_differs, "negative control: recompute without tracker replay matched"


# ------------------------------------------------------------------------- layout-independent init
def _init_params(ps, device=None):
    """A few parameters of every sharding kind, initialized by name."""
    shapes = {"col": (ColumnParallelLinear, (8, 16), {}), "fused": (ColumnParallelLinear,
              (8, 32), {"partition_stride": 2}), "row": (RowParallelLinear, (16, 8), {}),
              "emb": (VocabParallelEmbedding, (32, 8), {})}
    out = {}
    for name, (cls, args, kw) in shapes.items():
        m = cls(*args, ModelContext(ps, dtype=torch.float32), **kw)
        for pname, p in m.named_parameters():
            init_parameter_(p, lambda t, gen: t.normal_(0, 0.02, generator=gen), seed=5,
                            name=f"{name}.{pname}", ps=ps)
            out[f"{name}.{pname}"] = p
    return out


def check_init(tp):
    ps = ParallelState.build(tp)
    full = {k: gather_full_tensor(p, p, ps) for k, p in _init_params(ps).items()}
    single = {k: p.detach() for k, p in _init_params(ParallelState.single()).items()}
    return {k: torch.equal(full[k], single[k]) for k in single}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_init_parameter_is_layout_independent(workers, tp):
    for res in workers.run(check_init, tp):
        assert all(res.values()), res


# ------------------------------------------------------------ env init, harness failure modes
def check_env_init():
    init_distributed()  # from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by the harness
    assert dist.get_backend() == "gloo"
    ps = ParallelState.build(tensor_model_parallel_size=2)
    t = torch.tensor([float(ps.rank)])
    dist.all_reduce(t, group=ps.tp_group)
    return t.item()


def raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # the other ranks would wait forever: the harness must kill them


def test_init_distributed_from_env_and_harness_kills_a_hanging_group():
    with DistributedWorkers(2, timeout=60, init_process_group=False) as w:
        assert w.run(check_env_init) == [1.0, 1.0]
        with pytest.raises(DistributedTestError, match=r"timed out waiting for rank\(s\) \[0\]"):
            w.run(sleep_on_rank_zero, timeout=3)


def sleep_on_rank_zero():
    import time
    if dist.get_rank() == 0:
        time.sleep(600)
    return "done"


def test_harness_reports_a_failing_rank(workers):
    # Last test of the module: the failure tears the shared group down.
    workers.failure_grace_s = 2.0
    with pytest.raises(DistributedTestError, match=r"(?s)still busy.*deliberate failure on rank 1"):
        workers.run(raise_on_rank_one)
