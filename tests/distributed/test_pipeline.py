"""Pipeline schedules give the single-process losses and gradients: real gloo process groups.

One 4-process group runs every case (layouts built on it with ParallelState.build); the
reference runs in the test process: the full model (same seed; ``init_weights`` is
layout-independent) forwards every microbatch of every data-parallel rank and backpropagates
``sum(loss_i) / (num_microbatches * dp)``, which is what the schedules + the data-parallel
average compute.

Tolerance: per tensor, max|pipeline - reference| <= REL * max|reference| (float32). A pipeline
runs exactly the operations of the unsplit model on each microbatch, in the same microbatch
order, so without tensor parallelism the only re-associations are the tied embedding's two
gradients summed over the embedding group instead of accumulated by autograd, and the
data-parallel average ((a + b) / 2 versus accumulating b onto a): a few float32 ulps of the
tensor's scale (measured: <= 2.1e-7), so REL = 1e-6. With TP the per-layer partial sums are
reduced across ranks in a different order as well: 1e-5, as in
tests/distributed/test_model_tp.py (measured: <= 8.3e-7). Every gradient is also required to
be nonzero somewhere, so a comparison cannot pass on two zero tensors.
"""
from __future__ import annotations


import pytest
import torch

from harness import DistributedWorkers

from megalite.distributed.parallel_state import ParallelState
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext

B, S, SEED = 2, 16, 7
RECIPES = {
    # classic: tied embedding, learned positions, LayerNorm, biases
    "classic": get_preset("tiny").replace(vocab_size=200, max_position_embeddings=S,
                                          seq_length=S),
    # llama: untied output layer, RoPE, RMSNorm, SwiGLU, GQA, no biases
    "llama": get_preset("tiny-llama").replace(vocab_size=200, max_position_embeddings=S,
                                              seq_length=S),
}
# name: recipe, layers, tp, pp, virtual stages, explicit split, microbatches per dp rank, SP,
# forward only, bucket bytes for the DP all-reduce (small: many buckets)
CASES = {
    "pp4-1f1b-tied": dict(recipe="classic", layers=4, tp=1, pp=4, vp=1, split=None, m=5),
    "pp2-dp2-interleaved-llama": dict(recipe="llama", layers=4, tp=1, pp=2, vp=2, split=None,
                                      m=4, bucket=4096),
    "tp2-pp2-sp-tied": dict(recipe="classic", layers=2, tp=2, pp=2, vp=1, split=None, m=3,
                            sp=True),
    "tp2-pp2-interleaved-8layers-llama": dict(recipe="llama", layers=8, tp=2, pp=2, vp=2,
                                              split=None, m=2),
    "pp4-uneven-split": dict(recipe="classic", layers=4, tp=1, pp=4, vp=1, split=[1, 2, 1, 0],
                             m=3),
    "pp2-dp2-uneven-split-llama": dict(recipe="llama", layers=4, tp=1, pp=2, vp=1,
                                       split=[1, 3], m=2),
    "pp2-dp2-interleaved-eval": dict(recipe="classic", layers=4, tp=1, pp=2, vp=2, split=None,
                                     m=4, forward_only=True),
}


def case_config(case):
    return RECIPES[case["recipe"]].replace(num_layers=case["layers"],
                                           sequence_parallel=case.get("sp", False))


def microbatches(cfg, dp_rank, m):
    g = torch.Generator().manual_seed(1000 + dp_rank)
    out = []
    for _ in range(m):
        ids = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=g)
        out.append({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
    return out


def worker_case(name):
    from megalite.parallel.grad_sync import (allreduce_embedding_grads, allreduce_gradients,
                                             allreduce_sequence_parallel_grads,
                                             tied_embedding_params)
    from megalite.parallel.sharding import gather_full_tensor
    from megalite.parallel.pipeline import build_model_chunks, forward_backward
    from megalite.training.loss import GPTLoss

    case = CASES[name]
    ps = ParallelState.build(case["tp"], case["pp"])
    cfg = case_config(case)
    chunks = build_model_chunks(cfg, ModelContext(ps), vp_size=case["vp"], split=case["split"])
    for chunk in chunks:
        chunk.init_weights(SEED)
    forward_only = case.get("forward_only", False)
    mbs = microbatches(cfg, ps.dp_rank, case["m"])
    losses = forward_backward(chunks, iter(mbs), case["m"], ps, GPTLoss(case["m"]),
                              seq_length=S, micro_batch_size=B, dtype=torch.float32,
                              forward_only=forward_only)
    out = {"coords": (ps.tp_rank, ps.dp_rank, ps.pp_rank), "losses": losses,
           "embedding_ranks": ps.embedding_ranks, "grads": {}, "tied_before": None}
    if forward_only:
        out["any_grad"] = any(p.grad is not None for c in chunks for p in c.parameters())
        return out
    for chunk in chunks:
        allreduce_sequence_parallel_grads(chunk.parameters(), ps)
    tied = tied_embedding_params(chunks)
    if tied:   # this stage's own share of the tied gradient, before the sum
        out["tied_before"] = gather_full_tensor(tied[0].grad, tied[0], ps)
    allreduce_embedding_grads(chunks, ps)
    params = [p for c in chunks for p in c.parameters()]
    allreduce_gradients([p.grad for p in params], ps, bucket_bytes=case.get("bucket", 2**20))
    for chunk in chunks:
        for n, p in chunk.named_parameters():
            full = gather_full_tensor(p.grad, p, ps)
            out["grads"][n] = full if ps.tp_rank == 0 else None
    return out


def reference(case):
    cfg = case_config(case).replace(sequence_parallel=False)
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(SEED)
    dp = 4 // (case["tp"] * case["pp"])
    m = case["m"]
    losses = {}
    for d in range(dp):
        losses[d] = []
        for mb in microbatches(cfg, d, m):
            loss = model(mb["tokens"], labels=mb["labels"]).mean()
            losses[d].append(loss.detach())
            if not case.get("forward_only", False):
                (loss / (m * dp)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return losses, grads


def assert_close(name, got, ref, rel):
    assert got.shape == ref.shape, name
    scale = ref.abs().max().item()
    assert scale > 0, f"{name}: reference gradient is all zero (the test would be vacuous)"
    err = (got - ref).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x {scale:.3g}"


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(4, timeout=240) as w:
        yield w


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_matches_single_process(workers, name):
    case = CASES[name]
    results = workers.run(worker_case, name)
    ref_losses, ref_grads = reference(case)
    rel = 1e-5 if case["tp"] > 1 else 1e-6
    pp = case["pp"]
    last = [r for r in results if r["coords"][2] == pp - 1]
    # Losses: on the last stage (every tp rank), one per microbatch in order; none elsewhere.
    for r in results:
        if r["coords"][2] != pp - 1:
            assert r["losses"] == []
    for r in last:
        got = torch.stack(r["losses"])
        ref = torch.stack(ref_losses[r["coords"][1]])
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=rel, atol=0)
    # The embedding group: first and last stage of each (tp, dp) coordinate.
    for r in results:
        t, d, _ = r["coords"]
        expect = tuple(rr for rr, x in enumerate(results)
                       if x["coords"][:2] == (t, d) and x["coords"][2] in (0, pp - 1))
        assert r["embedding_ranks"] == expect
    if case.get("forward_only", False):
        assert not any(r["any_grad"] for r in results)
        return
    # Gradients: every parameter of the full model exactly once per (dp replica); dp replicas
    # hold identical (averaged) gradients.
    tied = RECIPES[case["recipe"]].tied_embeddings
    dp_size = 4 // (case["tp"] * pp)
    for d in range(dp_size):
        merged = {}
        for r in results:
            if r["coords"][:2] != (0, d):
                continue
            for n, g in r["grads"].items():
                if n == "output_layer.weight" and tied:
                    n = "embedding.word_embeddings.weight (last-stage copy)"
                assert n not in merged, f"{n} held by two stages"
                merged[n] = g
        expect = set(ref_grads)
        if tied and pp > 1:
            expect.add("embedding.word_embeddings.weight (last-stage copy)")
        assert set(merged) == expect
        for n, g in merged.items():
            assert_close(f"dp{d} {n}", g, ref_grads[n.split(" ")[0]], rel)
    if tied and pp > 1:
        # Before the sum each copy held only its own use's gradient (different, both nonzero);
        # after it both equal the single-process gradient of the tied weight (checked above).
        first = next(r["tied_before"] for r in results if r["coords"] == (0, 0, 0))
        lastc = next(r["tied_before"] for r in results if r["coords"] == (0, 0, pp - 1))
        assert first.abs().max() > 0 and lastc.abs().max() > 0
        assert (first - lastc).abs().max() > 1e-3 * first.abs().max()
        assert_close("tied sum", first + lastc, ref_grads["embedding.word_embeddings.weight"], rel)
