"""AllToAllDispatcher in a real gloo group of 4 processes against a local computation.

Every rank builds the whole problem (every rank's tokens and routing, from one seed), runs its
own share through the dispatcher with its local experts (one linear map per expert, a weight
known to every rank), and compares with the plain single-process mixture
``out[t] = sum_j probs[t, j] * W[e[t, j]] @ hidden[t]`` over its own tokens; then the gradients of
hidden, probs and its experts' weights against autograd through that plain computation over
all ranks' tokens. Tolerance: float64, 1e-12 relative (the dispatcher moves the same rows and
sums the same products; only the matmul blocking of different row counts can differ, ~1e-16).
The rows each expert receives and the counts are compared bitwise (pure data movement).
"""
from __future__ import annotations

import pytest
import torch

from harness import DistributedWorkers

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.parallel.expert_dispatch import AllToAllDispatcher

WORLD = 4
E, H, K, T = 8, 6, 2, 10


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(WORLD) as w:
        yield w


def _problem(routing: str):
    """Every rank's hidden [T, H], probs/ids [T, K], and the expert weights W [E, H, H]."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(WORLD, T, H, generator=g, dtype=torch.float64)
    logits = torch.randn(WORLD, T, E, generator=g, dtype=torch.float64)
    if routing == "skewed":      # every token picks experts 0 and 1: the others get none
        logits[..., 0] += 100
        logits[..., 1] += 50
    probs, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    if routing == "dropped":     # capacity: some assignments are dropped (expert id -1)
        ids[:, ::3, 1] = -1
        ids[1, :, :] = -1         # and one rank sends nothing at all
    weights = torch.randn(E, H, H, generator=g, dtype=torch.float64)
    return hidden, probs, ids, weights


def _reference(hidden, probs, ids, weights):
    """Plain mixture over tokens [..., T, H] -> [..., T, H]; dropped assignments count 0."""
    return torch.einsum("...tk,...tkoi,...ti->...to", probs * (ids >= 0), weights[ids.clamp(0)],
                        hidden)


def _run(ep: int, routing: str):
    ps = ParallelState.build(1, 1, expert_model_parallel_size=ep)
    hidden_all, probs_all, ids_all, weights = _problem(routing)
    r = ps.dp_rank
    hidden = hidden_all[r].clone().requires_grad_()
    probs = probs_all[r].clone().requires_grad_()
    L = E // ep
    local_w = weights[ps.ep_rank * L:(ps.ep_rank + 1) * L].clone().requires_grad_()
    disp = AllToAllDispatcher(E, ps)
    expert_input, per_expert = disp.dispatch(hidden, probs, ids_all[r])
    outs, start = [], 0
    for j, n in enumerate(per_expert.tolist()):
        outs.append(expert_input[start:start + n] @ local_w[j].T)
        start += n
    out = disp.combine(torch.cat(outs))
    # an arbitrary upstream gradient, different per rank
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + r),
                           dtype=out.dtype)
    (out * upstream).sum().backward()
    return dict(out=out.detach(), expert_input=expert_input.detach(), per_expert=per_expert,
                dhidden=hidden.grad, dprobs=probs.grad, dw=local_w.grad, ep_rank=ps.ep_rank,
                ep_ranks=ps.ep_group_ranks)


@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("routing", ["random", "skewed", "dropped"])
def test_alltoall_dispatch_equals_local_mixture(workers, ep, routing):
    results = workers.run(_run, ep, routing)
    hidden, probs, ids, weights = _problem(routing)
    ref_hidden, ref_probs, ref_w = (t.clone().requires_grad_() for t in (hidden, probs, weights))
    ref = _reference(ref_hidden, ref_probs, ids, ref_w)
    upstream = torch.stack([torch.randn(T, H, generator=torch.Generator().manual_seed(100 + r),
                                        dtype=torch.float64) for r in range(WORLD)])
    (ref * upstream).sum().backward()
    L = E // ep
    for r, res in enumerate(results):
        torch.testing.assert_close(res["out"], ref[r].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["dhidden"], ref_hidden.grad[r], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["dprobs"], ref_probs.grad[r], rtol=1e-12, atol=1e-12)
        # expert weights: gradient over the tokens of this rank's EP group only (the expert-DP
        # reduction over the other groups is grad_sync's job)
        group = list(res["ep_ranks"])
        e0 = res["ep_rank"] * L
        sub_w = weights.clone().requires_grad_()
        (_reference(hidden[group], probs[group], ids[group], sub_w) * upstream[group]).sum() \
            .backward()
        torch.testing.assert_close(res["dw"], sub_w.grad[e0:e0 + L], rtol=1e-12, atol=1e-12)
        # bitwise: expert j gets source 0's tokens then source 1's..., each in token order
        rows, counts = [], []
        for j in range(L):
            sel = [hidden[s][(ids[s] == e0 + j).any(-1)] for s in group]
            rows += sel
            counts.append(sum(len(x) for x in sel))
        assert res["per_expert"].tolist() == counts
        assert torch.equal(res["expert_input"], torch.cat(rows))
    if routing == "skewed":
        assert any(0 in res["per_expert"].tolist() for res in results)   # empty experts ran


def _bad_ids():
    ps = ParallelState.build(1, 1, expert_model_parallel_size=2)
    disp = AllToAllDispatcher(E, ps)
    try:
        disp.dispatch(torch.zeros(3, H), torch.ones(3, 1), torch.full((3, 1), E))
    except MegaliteError as e:
        return str(e)
    return None


def test_expert_ids_out_of_range_is_a_clear_error(workers):
    assert workers.run(_bad_ids) == [f"expert ids must lie in [0, {E}), got max {E}"] * WORLD


def test_experts_not_divisible_by_ep_is_a_clear_error():
    ps = ParallelState.for_shapes(1, dp_size=4, ep_size=4)
    with pytest.raises(MegaliteError, match="--expert-model-parallel-size 4 does not divide "
                                            "--num-experts 6"):
        AllToAllDispatcher(6, ps)
