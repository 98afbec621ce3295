"""Bucketed data-parallel all-reduce and the tied-embedding sum, in 2 real gloo processes.

Exactness: with two ranks a sum is one float addition, a + b, whatever the bucketing, and
dividing by 2 is exact; so the bucketed average must equal (a + b) / 2 computed here bit for
bit (torch.equal), in float32 and in bfloat16.
"""
from __future__ import annotations


import pytest
import torch

from harness import DistributedWorkers

from megalite.distributed.parallel_state import ParallelState
from megalite.parallel.grad_sync import _buckets

SHAPES = [((3, 5), torch.float32), ((100,), torch.float32), ((7,), torch.float32),
          ((40, 30), torch.float32), ((6, 4), torch.bfloat16), ((9,), torch.bfloat16),
          ((4, 6), torch.float32)]


def rank_tensors(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ts = [torch.randn(shape, generator=g).to(dtype) for shape, dtype in SHAPES]
    ts[-1] = ts[-1].t()   # a non-contiguous gradient view must be written back in place
    return ts


def worker_allreduce(average, bucket_bytes):
    from megalite.parallel.grad_sync import allreduce_gradients
    ps = ParallelState.build()          # world 2: dp = 2
    assert ps.dp_size == 2
    ts = rank_tensors(ps.rank)
    storages = [t.data_ptr() for t in ts]
    allreduce_gradients(ts, ps, average=average, bucket_bytes=bucket_bytes)
    assert [t.data_ptr() for t in ts] == storages      # in place
    return ts


def worker_allreduce_flat_buffer():
    # gradients that are views into one flat buffer (the optimizer's main_grad layout) are
    # reduced in place; a bucket boundary (96 bytes) falls between them
    from megalite.parallel.grad_sync import allreduce_gradients
    ps = ParallelState.build()
    g = torch.Generator().manual_seed(100 + ps.rank)
    buf = torch.randn(60, generator=g)
    before = buf.clone()
    views = [buf[0:12].view(3, 4), buf[12:20], buf[20:60].view(8, 5)]
    allreduce_gradients(views, ps, bucket_bytes=96)
    return before, buf


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(2, timeout=120) as w:
        yield w


@pytest.mark.parametrize("average, bucket_bytes", [(True, 512), (True, 25 * 2**20),
                                                   (False, 64)])
def test_bucketed_allreduce_equals_average(workers, average, bucket_bytes):
    results = workers.run(worker_allreduce, average, bucket_bytes)
    a, b = rank_tensors(0), rank_tensors(1)
    for i, (x, y) in enumerate(zip(a, b)):
        expect = (x + y) / 2 if average else x + y
        for r in range(2):
            got = results[r][i]
            assert got.dtype == expect.dtype and got.shape == expect.shape
            assert torch.equal(got, expect), f"tensor {i} on rank {r}"
        assert not torch.equal(x, y)    # the ranks really held different gradients


def test_buckets_split_on_size_and_dtype():
    ts = [torch.zeros(n, dtype=d) for n, d in
          [(10, torch.float32), (10, torch.float32), (100, torch.float32), (4, torch.bfloat16),
           (4, torch.float32)]]
    sizes = [[t.numel() for t in b] for b in _buckets(ts, 80)]
    # 40 + 40 bytes fill a bucket; the 400-byte tensor gets its own; dtype change starts one
    assert sizes == [[10, 10], [100], [4], [4]]
    assert [[t.numel() for t in b] for b in _buckets(ts, 10**6)] == [[10, 10, 100], [4], [4]]


def worker_embedding_group(grad_attr):
    import torch.distributed as dist
    from megalite.model import get_preset
    from megalite.parallel.context import ModelContext
    from megalite.parallel.grad_sync import allreduce_embedding_grads
    from megalite.parallel.pipeline import build_model_chunks
    ps = ParallelState.build(1, 2)      # world 2: pp = 2, the two stages form the group
    assert ps.embedding_ranks == (0, 1) and ps.embedding_group is not None
    x = torch.tensor([float(ps.rank + 1)])
    dist.all_reduce(x, group=ps.embedding_group)
    cfg = get_preset("tiny").replace(vocab_size=200)
    chunks = build_model_chunks(cfg, ModelContext(ps))
    w = (chunks[0].embedding.word_embeddings.weight if ps.rank == 0
         else chunks[0].output_layer.weight)
    # rank 0's copy has a gradient, rank 1's has none yet (must count as zero)
    grad = torch.full(w.shape, 3.0) if ps.rank == 0 else None
    setattr(w, grad_attr, grad)
    allreduce_embedding_grads(chunks, ps, grad_attr=grad_attr)
    return x.item(), getattr(w, grad_attr)


@pytest.mark.parametrize("grad_attr", ["grad", "main_grad"])
def test_embedding_group_sums_the_two_copies(workers, grad_attr):
    (x0, g0), (x1, g1) = workers.run(worker_embedding_group, grad_attr)
    assert x0 == x1 == 3.0
    assert torch.equal(g0, g1) and torch.all(g0 == 3.0)


def test_flat_buffer_views_reduced_in_place(workers):
    (a, out0), (b, out1) = workers.run(worker_allreduce_flat_buffer)
    assert torch.equal(out0, (a + b) / 2) and torch.equal(out1, out0)
