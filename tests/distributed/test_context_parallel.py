"""Context parallelism (megalite.parallel.context_parallel): the ring attention of CP ranks
equals one process's causal attention over the whole sequence, forward and backward, and the
layout of chunks is the load-balanced one.

Tolerance: fp32, 1e-5 absolute on outputs and gradients of O(1) magnitude: the ring merges
softmax blocks in another order (online log-sum-exp) than one kernel over all keys, which moves
values by a few ulps (~1e-7); anything wrong in the masking, the chunk order or the gradient's
way home is O(1e-1).
"""
from __future__ import annotations

import pytest
import torch

from harness import DistributedWorkers
from megalite.errors import MegaliteError
from megalite.parallel.context_parallel import local_indices


def test_local_indices_balanced():
    assert local_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([local_indices(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))          # each token on exactly one rank
    with pytest.raises(MegaliteError, match="not divisible by 2 x --context-parallel-size 2"):
        local_indices(10, 2, 0)


def _doc_ids(kind: str | None, b: int, s: int, cp: int) -> torch.Tensor | None:
    """Packed documents [b, s]: None (plain causal), "chunks" (every load-balancing chunk its
    own document: no query sees another rank's keys, every ring step but the first is
    skipped) or "random" (boundaries anywhere, some spanning ranks)."""
    if kind is None:
        return None
    if kind == "chunks":
        return (torch.arange(s) // (s // (2 * cp))).expand(b, s).clone()
    gen = torch.Generator().manual_seed(11)
    eod = torch.rand(b, s, generator=gen) < 0.15
    return torch.cumsum(eod.long(), dim=1) - eod.long()


def _ring_vs_full(cp: int, heads: int, groups: int, docs: str | None = None) -> dict:
    """On every rank of a CP group (the whole world): this rank's ring attention output and
    gradients next to the same rows of one-process attention over the full sequence (causal,
    or inside each document: megalite.model.doc_attention's attention as the reference)."""
    import torch.nn.functional as F

    from megalite.distributed.parallel_state import ParallelState
    from megalite.model.doc_attention import document_attention
    from megalite.parallel.context_parallel import RingDocuments, ring_attention

    ps = ParallelState.build(context_parallel_size=cp)
    b, s, d = 2, 8 * cp, 8
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, heads, s, d, generator=gen, requires_grad=True)
    k = torch.randn(b, groups, s, d, generator=gen, requires_grad=True)
    v = torch.randn(b, groups, s, d, generator=gen, requires_grad=True)
    dout = torch.randn(b, heads, s, d, generator=gen)
    doc_ids = _doc_ids(docs, b, s, cp)
    if doc_ids is None:
        full = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                              enable_gqa=heads != groups)
    else:
        pos = torch.arange(s).expand(b, s)
        full = document_attention(q, k, v, doc_ids, doc_ids, pos, pos, 0.3)
    full.backward(dout)
    idx = local_indices(s, cp, ps.cp_rank)
    ql, kl, vl = (t.detach()[:, :, idx].clone().requires_grad_() for t in (q, k, v))
    ring_docs = None if doc_ids is None else RingDocuments(doc_ids[:, idx], ps)
    out = ring_attention(ql, kl, vl, ps, scale=0.3, docs=ring_docs)
    out.backward(dout[:, :, idx])
    return {"visible": None if ring_docs is None else ring_docs.visible,
            "out": (out - full.detach()[:, :, idx]).abs().max().item(),
            "dq": (ql.grad - q.grad[:, :, idx]).abs().max().item(),
            "dk": (kl.grad - k.grad[:, :, idx]).abs().max().item(),
            "dv": (vl.grad - v.grad[:, :, idx]).abs().max().item(),
            "scale": q.grad.abs().max().item()}


@pytest.mark.timeout(600)
def test_ring_attention_equals_full_attention():
    for world in (2, 4):
        with DistributedWorkers(world) as workers:
            for heads, groups, docs in ((4, 4, None), (4, 2, None), (4, 2, "random"),
                                        (4, 4, "chunks")):
                results = workers.run(_ring_vs_full, world, heads, groups, docs)
                for rank, errs in enumerate(results):
                    assert errs["scale"] > 1e-2                 # the gradients are not all zero
                    for name in ("out", "dq", "dk", "dv"):
                        assert errs[name] < 1e-5, (world, heads, groups, docs, rank, name, errs)
                if docs == "chunks":    # only the own block is visible: the others skipped
                    assert all(sum(r["visible"]) == 1 for r in results)
                    assert all(r["visible"][rank] for rank, r in enumerate(results))
                if docs == "random":    # some blocks of other ranks are seen
                    assert any(sum(r["visible"]) > 1 for r in results)


@pytest.mark.parametrize("causal", [True, False])
def test_block_math_equals_cpu_flash_kernel(causal):
    """The explicit math of a ring block (what runs off CPU) against torch's CPU flash kernel:
    output, log-sum-exp and the backward given a merged output/log-sum-exp (fp32, GQA)."""
    from megalite.parallel.context_parallel import _block_backward, _block_forward

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 6, 8, generator=gen)
    k, v = torch.randn(2, 2, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    dout = torch.randn(2, 4, 6, 8, generator=gen)
    results = {}
    for kernel in ("flash", "math"):
        out, lse = _block_forward(q, k, v, causal, 0.3, kernel)
        # a merged output/lse as another block would leave them: shifted log-sum-exp
        grads = _block_backward(dout, q, k, v, out * 0.5, lse + 0.7, causal, 0.3, kernel)
        results[kernel] = (out, lse, *grads)
    for a, b in zip(results["flash"], results["math"]):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5
