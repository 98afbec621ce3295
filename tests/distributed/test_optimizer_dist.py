"""megalite's Optimizer across real gloo process groups: every layout trains like one process.

``train`` (also used by test_zero.py) runs a few optimizer steps through the real pipeline
schedule (``forward_backward`` with the optimizer's ``backward``), ``finish_grad_sync`` and
``step``; the reference runs the same steps in the test process with ``ParallelState.single()``.

Checked here: the global gradient norm and the clipped gradients at TP=2 (+SP) against
``torch.nn.utils.clip_grad_norm_`` on the single-process model; losses, grad norms and final
parameters for TP x DP with sequence parallelism, PP x TP with a tied embedding (counted once in
the norm, both copies stay identical) and PP x DP (LLaMA recipe); bf16 at TP x DP against the
bf16 single process; an fp16 overflow on one rank makes every rank skip and halve its scale.

Tolerances (fp32): 1e-5 relative, per step for losses and norms; per tensor as
max|got - ref| <= 5e-5 * max|ref| for parameters (PARAM_REL, below: why) and 1e-5 for gradients. The layouts compute the same
sums in another order (tensor-parallel partial sums, microbatches on two replicas), a few float32
ulps per step. AdamW's eps is 1e-6 (see EPS) so near-zero gradient elements do not turn rounding
into +-lr steps. bf16: 2e-2 relative on losses (bf16 keeps 8 significant bits; the two runs
round different partial sums).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from harness import DistributedWorkers

from megalite.config import OptimConfig, PrecisionConfig
from megalite.distributed.parallel_state import ParallelState
from megalite.model import get_preset
from megalite.parallel.context import ModelContext
from megalite.parallel.pipeline.schedules import forward_backward
from megalite.parallel.pipeline.stages import build_model_chunks
from megalite.parallel.sharding import gather_full_tensor
from megalite.training.loss import GPTLoss

REL = 1e-5
# Parameters after 4 AdamW steps: the layouts' ~1e-7 relative gradient differences (fp32
# reduction order) pass through Adam's normalised update, which magnifies them for elements whose
# gradient nearly cancels; measured up to 1.6e-5 of a tensor's max (TP2 x PP2, a 1-thread
# reference). Losses and grad norms keep REL.
PARAM_REL = 5e-5
BF16_REL = 2e-2
SEED, GLOBAL_BATCH, MICRO, SEQ, VOCAB = 7, 8, 2, 16, 300
LRS = [1e-3, 2e-3, 2e-3, 1e-3]
CLIP = 0.5
# AdamW's eps. With the default 1e-8 the first steps are nearly sign descent, so an element whose
# gradient is ~0 (a cancellation) moves by +-lr depending on its rounding: merely splitting the
# same global batch into 4 instead of 2 microbatches in ONE process already moves parameters by
# 5.5e-4 of their tensor's max after 4 steps (measured). eps=1e-6 keeps such elements in Adam's
# linear regime (same split: 4.6e-6), so the parameter checks test the layouts, not Adam's
# conditioning.
EPS = 1e-6


def configs(*, bf16=False, fp16=False, **precision):
    return (OptimConfig(lr=1e-3, weight_decay=0.1, clip_grad=CLIP, adam_eps=EPS),
            PrecisionConfig(bf16=bf16, fp16=fp16, **precision))


def model_config(recipe: str, sp: bool = False):
    """A preset at VOCAB/SEQ; ``NAME-4l``: the preset with 4 layers (for virtual stages)."""
    layers = {}
    if recipe.endswith("-4l"):
        recipe, layers = recipe[:-3], {"num_layers": 4}
    return get_preset(recipe).replace(vocab_size=VOCAB, max_position_embeddings=SEQ,
                                      seq_length=SEQ, sequence_parallel=sp, **layers)


def global_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def build(recipe: str, tp: int, pp: int, sp: bool = False, vp: int = 1):
    """(ps, chunks) for this process: distributed when torch.distributed is initialized;
    ``vp`` virtual pipeline stages (chunks) per rank."""
    ps = (ParallelState.build(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
          if dist.is_initialized() else ParallelState.single())
    chunks = build_model_chunks(model_config(recipe, sp), ModelContext(ps), vp_size=vp)
    for c in chunks:
        c.init_weights(SEED)
    return ps, chunks


def make_optimizer(chunks, ps, zero_stage: int, precision_kw: dict):
    from megalite.optim.optimizer import Optimizer
    optim, precision = configs(**precision_kw)
    if zero_stage:
        from megalite.optim.zero import ZeroOptimizer
        return ZeroOptimizer(chunks, optim, precision, ps, zero_stage)
    return Optimizer(chunks, optim, precision, ps)


def full_params(chunks, ps, opt) -> dict:
    """This rank's chunks' parameters gathered to full shape over tp (names are global);
    inside ``opt.gathered_parameters()`` (ZeRO-3 partitions them)."""
    out = {}
    with opt.gathered_parameters():
        for c in chunks:
            out.update({n: gather_full_tensor(p.detach().float(), p, ps)
                        for n, p in c.named_parameters()})
    return out


def run_steps(chunks, opt, ps, steps: int, before_sync=None):
    """``steps`` optimizer steps on the fixed global batch; returns (losses, results).

    Losses (mean over the global batch) are known on the last stage, None elsewhere.
    ``before_sync(step)`` runs before finish_grad_sync (to inject an overflow)."""
    tokens, labels = global_batch()
    per_rank = GLOBAL_BATCH // ps.dp_size
    rows = slice(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank)
    tokens, labels = tokens[rows], labels[rows]
    n_micro = per_rank // MICRO
    dtype = next(chunks[0].parameters()).dtype
    losses, results = [], []
    for step in range(steps):
        mbs = iter([{"tokens": tokens[m * MICRO:(m + 1) * MICRO],
                     "labels": labels[m * MICRO:(m + 1) * MICRO]} for m in range(n_micro)])
        reported = forward_backward(chunks, mbs, n_micro, ps, GPTLoss(n_micro, opt.loss_scale),
                                    seq_length=SEQ, micro_batch_size=MICRO, dtype=dtype,
                                    backward_fn=opt.backward)
        if before_sync is not None:
            before_sync(step)
        opt.finish_grad_sync()
        results.append(opt.step(LRS[step % len(LRS)]))
        opt.zero_grad()
        if ps.is_last_pp_stage:
            mean = torch.stack(reported).mean()
            if ps.dp_size > 1:
                dist.all_reduce(mean, group=ps.dp_group)
                mean /= ps.dp_size
            losses.append(float(mean))
        else:
            losses.append(None)
    return losses, results


def train(recipe: str, tp: int = 1, pp: int = 1, zero_stage: int = 0, *, sp: bool = False,
          vp: int = 1, steps: int = len(LRS), **precision_kw) -> dict:
    """Train and report losses, grad norms, skips, full parameters and optimizer-state bytes."""
    ps, chunks = build(recipe, tp, pp, sp, vp)
    opt = make_optimizer(chunks, ps, zero_stage, precision_kw)
    losses, results = run_steps(chunks, opt, ps, steps)
    return {"losses": losses, "norms": [r.grad_norm for r in results],
            "skipped": [r.skipped for r in results], "params": full_params(chunks, ps, opt),
            "state_bytes": opt.optimizer_state_bytes(), "pp_rank": ps.pp_rank}


_REFS: dict = {}


def reference(recipe: str, **precision_kw) -> tuple[dict, dict]:
    """(single-process run with megalite's Optimizer, initial parameters), cached."""
    key = (recipe, tuple(sorted(precision_kw.items())))
    if key not in _REFS:
        # One intra-op thread, as in the workers: fp32 GEMM results depend on the thread count,
        # and the reference must not depend on what earlier tests left the test process with.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _, chunks = build(recipe, 1, 1)
            init = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
            _REFS[key] = (train(recipe, **precision_kw), init)
        finally:
            torch.set_num_threads(threads)
    return _REFS[key]


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    if a.shape != b.shape:       # vocabulary padded differently under TP: the real rows
        a, b = a[:VOCAB], b[:VOCAB]
    return bool((a - b).abs().max() <= rel * b.abs().max())


def assert_same_training(results: list[dict], ref: dict, init: dict, rel: float = REL,
                         tied: bool = False, param_rel: float = PARAM_REL) -> None:
    """Every rank's run equals the reference: losses (last stage), norms, parameters; the
    union of the ranks' parameters covers the whole model; a tied embedding's two copies
    are equal."""
    assert ref["norms"][0] > CLIP, "clipping must be active for the test to mean something"
    seen = set()
    for got in results:
        for i, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
            assert a is None or abs(a - b) <= rel * abs(b), f"step {i + 1}: loss {a} vs {b}"
        assert any(a is not None for a in got["losses"]) == (got["pp_rank"] == max(
            r["pp_rank"] for r in results))
        for i, (a, b) in enumerate(zip(got["norms"], ref["norms"])):
            assert abs(a - b) <= rel * abs(b), f"step {i + 1}: grad norm {a} vs {b}"
        for name, p in got["params"].items():
            if name == "output_layer.weight" and tied:
                # the last stage's copy of the tied embedding: equal to the reference's
                # embedding (hence to the first stage's copy)
                assert close(p, ref["params"]["embedding.word_embeddings.weight"], param_rel), name
                continue
            assert not torch.equal(ref["params"][name], init[name]), f"{name} did not move"
            assert close(p, ref["params"][name], param_rel), f"{name} differs"
            seen.add(name)
    assert seen == set(ref["params"])


@pytest.fixture(scope="module")
def workers2():
    with DistributedWorkers(2) as w:
        yield w


@pytest.fixture(scope="module")
def workers4():
    with DistributedWorkers(4) as w:
        yield w


# -- clipping at TP=2 vs torch on the single-process model -----------------------------------
def tp_clipped_grads(recipe: str, sp: bool):
    """One accumulation at TP=2 (or in one process): (global norm, full clipped grads)."""
    from megalite.optim.grad_clip import clip_by_global_norm, grad_norm_tensor
    ps, chunks = build(recipe, 2 if dist.is_initialized() else 1, 1, sp)
    opt = make_optimizer(chunks, ps, 0, {})
    tokens, labels = global_batch()
    forward_backward(chunks, iter([{"tokens": tokens[:MICRO], "labels": labels[:MICRO]}]), 1,
                     ps, GPTLoss(1), seq_length=SEQ, micro_batch_size=MICRO, dtype=torch.float32,
                     backward_fn=opt.backward)
    opt.finish_grad_sync()
    if not dist.is_initialized():   # the reference: torch's own function on the whole model
        norm = float(torch.nn.utils.clip_grad_norm_(opt.params, 0.01))
    else:
        grads = [p.grad for p in opt.params]
        norm = float(grad_norm_tensor(opt.params, grads, ps))
        clip_by_global_norm(grads, norm, 0.01)
    return norm, {n: gather_full_tensor(p.grad, p, ps) for n, p in chunks[0].named_parameters()}


@pytest.mark.parametrize("recipe,sp", [("tiny", True), ("tiny-llama", False)])
def test_tp2_global_norm_and_clipping_match_torch(workers2, recipe, sp):
    ref_norm, ref_grads = tp_clipped_grads(recipe, sp)
    for norm, grads in workers2.run(tp_clipped_grads, recipe, sp):
        assert abs(norm - ref_norm) <= REL * ref_norm
        for name, g in grads.items():
            assert g.abs().max() > 0, name
            assert close(g, ref_grads[name], REL), name


# -- training equivalence across layouts -----------------------------------------------------
@pytest.mark.parametrize("recipe,tp,pp,sp", [("tiny", 2, 1, True),        # TP x DP, SP
                                             ("tiny", 2, 2, False),       # TP x PP, tied emb.
                                             ("tiny-llama", 1, 2, False)],  # PP x DP
                         ids=["tp2-dp2-sp", "tp2-pp2-tied", "pp2-dp2-llama"])
def test_layouts_train_like_one_process(workers4, recipe, tp, pp, sp):
    ref, init = reference(recipe)
    results = workers4.run(train, recipe, tp, pp, sp=sp)
    assert_same_training(results, ref, init,
                         tied=model_config(recipe).tied_embeddings and pp > 1)


def test_bf16_tp2_dp2_tracks_bf16_single_process(workers4):
    ref, init = reference("tiny-llama", bf16=True)
    results = workers4.run(train, "tiny-llama", 2, 1, bf16=True)
    for got in results:
        for a, b in zip(got["losses"], ref["losses"]):
            assert abs(a - b) <= BF16_REL * b
        for a, b in zip(got["norms"], ref["norms"]):
            assert abs(a - b) <= BF16_REL * b
    assert results[0]["losses"][-1] < results[0]["losses"][0]


# -- fp16 overflow on one rank ---------------------------------------------------------------
def overflow_on_rank1():
    ps, chunks = build("tiny", 2, 1)
    opt = make_optimizer(chunks, ps, 0, {"fp16": True, "initial_loss_scale": 4096.0,
                                         "hysteresis": 1})
    before = full_params(chunks, ps, opt)

    def poison(step):
        if step == 0 and dist.get_rank() == 1:
            opt.params[-1].main_grad.view(-1)[0] = float("inf")

    _, results = run_steps(chunks, opt, ps, 2, before_sync=poison)
    return [(r.skipped, r.loss_scale) for r in results], opt.loss_scale, before, \
        full_params(chunks, ps, opt)


def test_fp16_overflow_on_one_rank_skips_everywhere(workers4):
    for steps, scale, before, after in workers4.run(overflow_on_rank1):
        assert steps == [(True, 4096.0), (False, 2048.0)]
        assert scale == 2048.0
        assert any(not torch.equal(after[n], before[n]) for n in before)
        assert all(math.isfinite(float(p.abs().max())) for p in after.values())
