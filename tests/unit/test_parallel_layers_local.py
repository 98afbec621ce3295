"""Tensor-parallel building blocks in one process: TP=1 equals plain torch (bitwise: the same
ops run), sharding arithmetic, layout-independent init simulated for every tp_rank with
``ParallelState.for_shapes`` (no processes), RNG tracker and recompute. Multi-process TP=2/4 checks
are in tests/distributed/test_parallel_layers.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.parallel import comm
from megalite.parallel.context import ModelContext
from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megalite.parallel.random import RNGStatesTracker, checkpoint, model_parallel_seed
from megalite.parallel.sharding import (full_shape, init_parameter_, set_sharding, shard_tensor,
                                        unshard_tensors)

SINGLE = ParallelState.single()


@settings(max_examples=60, deadline=None)
@given(tp=st.sampled_from([1, 2, 4, 8]), stride=st.sampled_from([1, 2, 3]),
       dim=st.sampled_from([0, 1, None]), rows=st.integers(1, 3), cols=st.integers(1, 3))
def test_shard_unshard_roundtrip(tp, stride, dim, rows, cols):
    shape = [rows * tp * stride, cols * tp * stride]
    full = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)
    shards = [shard_tensor(full, dim, stride, r, tp) for r in range(tp)]
    assert torch.equal(unshard_tensors(shards, dim, stride), full)
    if dim is not None and tp > 1:
        # Every element lives on exactly one rank, and each block is split separately.
        assert sorted(torch.cat([s.reshape(-1) for s in shards]).tolist()) == full.view(-1).tolist()
        assert all(s.shape[dim] == shape[dim] // tp for s in shards)
        block = shape[dim] // stride
        first = shards[0].narrow(dim, 0, block // tp)
        assert torch.equal(first, full.narrow(dim, 0, block // tp))
        if stride > 1:  # second piece of rank 0 is the start of the second block
            assert torch.equal(shards[0].narrow(dim, block // tp, block // tp),
                               full.narrow(dim, block, block // tp))


def test_fused_stride_layout_and_full_shape():
    full = torch.arange(8.0)  # [g0 g1 g2 g3 | u0 u1 u2 u3]
    assert shard_tensor(full, 0, 2, 1, 2).tolist() == [2.0, 3.0, 6.0, 7.0]
    p = set_sharding(nn.Parameter(torch.empty(4, 3)), 1, 1)
    assert full_shape(p, 4) == torch.Size([4, 12])
    with pytest.raises(MegaliteError, match="cannot be split into 2 block"):
        shard_tensor(torch.zeros(6), 0, 2, 0, 2)


def test_tp1_layers_equal_torch_without_torch_distributed(monkeypatch):
    # TP=1 must make no torch.distributed call at all: cut the modules off from it.
    from megalite.parallel import cross_entropy, layers, sharding
    for mod in (comm, layers, sharding, cross_entropy):
        if hasattr(mod, "dist"):      # (layers.py calls it only through comm)
            monkeypatch.setattr(mod, "dist", None)
    monkeypatch.setattr(comm, "_all_gather_single", None)
    monkeypatch.setattr(comm, "_reduce_scatter_single", None)
    torch.manual_seed(0)
    x = torch.randn(5, 2, 8, requires_grad=True)
    ctx = ModelContext(SINGLE)
    col = ColumnParallelLinear(8, 12, ctx, gather_output=True, sequence_parallel=True)
    row = RowParallelLinear(12, 8, ctx, sequence_parallel=True)
    ref1, ref2 = nn.Linear(8, 12), nn.Linear(12, 8)
    with torch.no_grad():
        for a, b in ((ref1, col), (ref2, row)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    y = row(F.gelu(col(x)))
    yr = ref2(F.gelu(ref1(x)))
    assert torch.equal(y, yr)
    emb = VocabParallelEmbedding(16, 8, ctx)
    ids = torch.randint(0, 16, (2, 5))
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
    # metadata that init, checkpoints and HF conversion rely on
    assert (col.weight.tensor_parallel_dim, row.weight.tensor_parallel_dim) == (0, 1)
    assert row.bias.tensor_parallel_dim is None and row.bias.sequence_parallel
    assert emb.weight.tensor_parallel_dim == 0 and not col.weight.sequence_parallel
    loss = vocab_parallel_cross_entropy(y, torch.zeros(5, 2, dtype=torch.long), SINGLE)
    loss.sum().backward()
    for f in (comm.copy_to_tp_region, comm.reduce_from_tp_region, comm.scatter_to_tp_region,
              comm.gather_from_tp_region, comm.scatter_to_sequence_parallel_region,
              comm.gather_from_sequence_parallel_region,
              comm.reduce_scatter_to_sequence_parallel_region):
        assert f(x, SINGLE) is x


def test_layer_sizes_not_divisible_are_clear_errors():
    meta = ModelContext(ParallelState.for_shapes(4), device="meta")
    with pytest.raises(MegaliteError, match="output size 6 is not divisible by tensor-parallel size 4"):
        ColumnParallelLinear(8, 6, meta)
    with pytest.raises(MegaliteError, match="vocabulary size 50 is not divisible"):
        VocabParallelEmbedding(50, 8, meta)
    with pytest.raises(MegaliteError, match="partition stride 2"):
        ColumnParallelLinear(8, 12, meta, partition_stride=2)


def test_per_rank_shapes_on_meta_device():
    ps = ParallelState.for_shapes(8, tp_rank=5)
    meta = ModelContext(ps, device="meta")
    col = ColumnParallelLinear(4096, 2 * 11008, meta, bias=False, partition_stride=2)
    row = RowParallelLinear(11008, 4096, meta, bias=False)
    emb = VocabParallelEmbedding(32000, 4096, meta)
    assert col.weight.shape == (2752, 4096) and row.weight.shape == (4096, 1376)
    assert emb.weight.shape == (4000, 4096) and (emb.vocab_start, emb.vocab_end) == (20000, 24000)


def _normal(t, g):
    t.normal_(0.0, 0.02, generator=g)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_init_parameter_same_full_tensor_for_every_tp(tp):
    def build(ps):
        ctx = ModelContext(ps)
        mods = {"col": ColumnParallelLinear(8, 16, ctx), "row": RowParallelLinear(16, 8, ctx),
                "fused": ColumnParallelLinear(8, 32, ctx, partition_stride=2),
                "emb": VocabParallelEmbedding(64, 8, ctx)}
        params = {f"{m}.{n}": p for m, mod in mods.items() for n, p in mod.named_parameters()}
        for name, p in params.items():
            init_parameter_(p, _normal, seed=11, name=name, ps=ps)
        return params

    ref = build(SINGLE)
    ranks = [build(ParallelState.for_shapes(tp, r)) for r in range(tp)]
    for name, p in ref.items():
        q = ranks[0][name]
        got = unshard_tensors([rk[name].detach() for rk in ranks], q.tensor_parallel_dim,
                              q.partition_stride)
        assert torch.equal(got, p.detach()), name
    assert not torch.equal(ref["col.weight"][:8], ref["row.weight"][:, :8].T)  # names matter
    meta = ColumnParallelLinear(8, 16, ModelContext(SINGLE, device="meta"))
    init_parameter_(meta.weight, _normal, seed=11, name="x", ps=SINGLE)  # skipped, no error


def test_cross_entropy_tp1_and_low_precision_logits():
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 50) * 4).requires_grad_()
    target = torch.randint(0, 50, (3, 4))
    loss = vocab_parallel_cross_entropy(logits, target, SINGLE)
    ref = F.cross_entropy(logits.view(-1, 50), target.view(-1), reduction="none").view(3, 4)
    # fp32 throughout; the two compute log-sum-exp in a different order: a few ulps.
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    g, = torch.autograd.grad(loss.square().sum(), logits)
    gr, = torch.autograd.grad(ref.square().sum(), logits)
    torch.testing.assert_close(g, gr, rtol=1e-6, atol=1e-7)
    b = logits.detach().bfloat16().requires_grad_()
    lb = vocab_parallel_cross_entropy(b, target, SINGLE)
    assert lb.dtype == torch.float32  # the loss is computed in fp32 even for bf16 logits
    lb.sum().backward()
    assert b.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(logits, target.view(-1), SINGLE)


def test_tracker_streams_per_tp_rank_and_state_roundtrip():
    def masks(tp_rank):
        tracker = model_parallel_seed(3, ParallelState.for_shapes(2, tp_rank))
        with tracker.fork():
            split = torch.rand(64)
        return split, torch.rand(64), tracker

    (s0, d0, t0), (s1, d1, _) = masks(0), masks(1)
    assert torch.equal(d0, d1) and not torch.equal(s0, s1)
    saved = t0.get_states()
    with t0.fork():
        a = torch.rand(8)
    t0.set_states(saved)
    with t0.fork():
        b = torch.rand(8)
    assert torch.equal(a, b)
    tracker = RNGStatesTracker()
    tracker.add("x", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("x", 2)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("y", 1)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("z"):
            pass


def test_checkpoint_tp1_same_gradients_with_dropout():
    lin = nn.Linear(6, 6, dtype=torch.float64)
    x0 = torch.randn(4, 6, dtype=torch.float64)

    def grads(mode):
        tracker = model_parallel_seed(9, SINGLE)
        lin.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()

        def f(t):
            with tracker.fork():
                t = F.dropout(lin(t), 0.5)
            return F.dropout(t.tanh(), 0.5)

        y = f(x) if mode == "plain" else checkpoint(f, tracker if mode == "replay" else None, x)
        y.sum().backward()
        return x.grad, lin.weight.grad

    plain, replay, no_replay = grads("plain"), grads("replay"), grads("no-replay")
    assert all(torch.equal(a, b) for a, b in zip(plain, replay))
    assert not all(torch.equal(a, b) for a, b in zip(plain, no_replay))  # the test can fail
