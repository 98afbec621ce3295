"""--overlap-grad-reduce: the same gradients, bit for bit, as reducing after the backward pass.

Each case trains 3 iterations of one layout twice in the same worker group, with and without
``--overlap-grad-reduce``, and compares after every step's gradient sync every gradient
(``torch.equal``: no tolerance, because both paths add the same numbers in the same order:
the same buckets, started in the same order; only *when* a bucket starts differs) and every
loss (``==``). That the overlap really happened is checked too: with it, buckets were started
from backward hooks before the sync (``started_in_backward > 0``), without it none were.

Cases: DP=2 with gradient accumulation (2 microbatches per rank) for GPT (classic: tied
embeddings; LLaMA in bf16: fp32 main_grad accumulation), BERT and T5; ZeRO-1 (DeepSpeed owns
the reduction: the flag changes nothing); PP=2 x DP=2 (1F1B and interleaved: buckets start only
after a stage's last microbatch, the tied-embedding copies' sum over the first and last stage
before their dp reduction) and TP=2 x DP=2 with sequence parallelism (the sequence-parallel
sums over tp before the dp reduction); mixture-of-experts layers with expert parallelism
(EP=2 at dp 2 and EP=2 x DP=2: expert gradients over the expert-data-parallel group after the
backward pass, dense ones overlapped); packed documents (document masking) through PP=2 x DP=2;
context parallelism (CP=2 x DP=2: nothing overlaps, the gradients are still bit-identical).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import DistributedWorkers

CONFIGS = Path(__file__).resolve().parents[2] / "megalite" / "configs"
ITERS = 3


def _argv(config: str, extra: list[str]) -> list[str]:
    return ["--config", str(CONFIGS / f"{config}.yaml"), "--mock-data", "--vocab-size", "500",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32",
            "--train-iters", str(ITERS), "--lr", "2e-3", "--lr-warmup-iters", "1",
            "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "100",
            "--seed", "7"] + extra


def _run(argv: list[str], tp: int, pp: int):
    """(losses, per step: the gradients after the sync, buckets started during backward)."""
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import Trainer

    argv = argv + ["--tensor-model-parallel-size", str(tp),
                   "--pipeline-model-parallel-size", str(pp)]
    trainer = Trainer(parse_train_args(argv))   # its layout from the flags (CP and EP too)
    opt = trainer.optimizer
    layout = {f: getattr(trainer.ps, f) for f in ("tp_size", "pp_size", "cp_size", "ep_size",
                                                   "dp_size")}
    grads, started = [], []
    finish = opt.finish_grad_sync

    def finish_and_record():
        buckets = getattr(opt, "grad_buckets", None)
        started.append(buckets.started_in_backward if buckets is not None else None)
        finish()
        if getattr(opt, "half", False):
            grads.append([p.main_grad.clone() for p in opt.params])
        elif opt.zero_stage == 0:
            grads.append([p.grad.clone() for p in opt.params])

    opt.finish_grad_sync = finish_and_record
    losses = [trainer.train_step()[0] for _ in range(ITERS)]
    return losses, grads, started, layout


def compare(argv: list[str], tp: int, pp: int):
    off = _run(argv + ["--no-overlap-grad-reduce"], tp, pp)
    on = _run(argv + ["--overlap-grad-reduce"], tp, pp)
    return off, on


def _check(results, what: str, dp_owned: bool = True) -> None:
    for rank, ((loss_off, g_off, s_off, _), (loss_on, g_on, s_on, _)) in enumerate(results):
        assert loss_on == loss_off, f"{what} rank {rank}: losses {loss_on} vs {loss_off}"
        assert len(g_on) == len(g_off)
        for step, (a, b) in enumerate(zip(g_on, g_off)):
            assert len(a) == len(b) > 0
            for i, (x, y) in enumerate(zip(a, b)):
                assert torch.equal(x, y), f"{what} rank {rank} step {step}: gradient {i} differs"
        if dp_owned:
            assert s_off == [0] * ITERS, f"{what}: buckets started without overlap: {s_off}"
            assert all(n > 0 for n in s_on), f"{what}: no bucket started in backward: {s_on}"
    assert all(r[0][0] == results[0][0][0] for r in results), f"{what}: ranks disagree"


@pytest.fixture(scope="module")
def two():
    with DistributedWorkers(2, timeout=600) as w:
        yield w


@pytest.mark.parametrize("config, extra", [
    ("tiny-gpt", []),
    ("tiny-llama", ["--bf16"]),
    ("tiny-bert", []),
    ("tiny-t5", ["--decoder-seq-length", "16"]),
])
def test_dp2_overlap_is_bit_identical(two, config, extra):
    _check(two.run(compare, _argv(config, extra), 1, 1, timeout=600), f"{config} DP=2 {extra}")


MOE = ["--num-layers", "2", "--num-experts", "4", "--moe-router-topk", "2",
       "--moe-ffn-hidden-size", "48", "--moe-aux-loss-coeff", "0.01"]
DOCS = ["--tokenizer-type", "NullTokenizer", "--reset-position-ids", "--reset-attention-mask",
        "--eod-mask-loss"]


def test_expert_parallel_overlap_is_bit_identical(two):
    # EP2 at dp 2: each expert on one rank, its gradient only divided by dp
    argv = _argv("tiny-llama", MOE + ["--expert-model-parallel-size", "2"])
    results = two.run(compare, argv, 1, 1, timeout=600)
    assert results[0][0][3]["ep_size"] == 2 and results[0][0][3]["dp_size"] == 2
    _check(results, "MoE EP=2")


def test_zero1_ignores_the_flag(two):
    results = two.run(compare, _argv("tiny-gpt", ["--zero-stage", "1"]), 1, 1, timeout=600)
    _check(results, "ZeRO-1 DP=2", dp_owned=False)


@pytest.mark.timeout(1200)
def test_pp_and_tp_layouts_overlap_is_bit_identical():
    cases = [("tiny-gpt", 1, 2, []),                     # PP2 x DP2, tied embeddings
             ("tiny-gpt", 1, 2, ["--num-layers-per-virtual-pipeline-stage", "1"]),
             ("tiny-llama", 2, 1, ["--sequence-parallel"]),         # TP2 x DP2 + SP
             ("tiny-gpt", 2, 1, ["--sequence-parallel", "--bf16"]),
             ("tiny-gpt", 1, 2, DOCS),                   # packed documents through PP
             ("tiny-llama", 1, 1, MOE + ["--expert-model-parallel-size", "2"])]  # EP2, dp 4
    with DistributedWorkers(4, timeout=1200) as w:
        for config, tp, pp, extra in cases:
            results = w.run(compare, _argv(config, extra), tp, pp, timeout=900)
            layout = results[0][0][3]
            assert (layout["tp_size"], layout["pp_size"]) == (tp, pp)
            assert layout["dp_size"] == 4 // (tp * pp)
            _check(results, f"{config} TP={tp} PP={pp} {extra}")
        # CP2 x DP2: every gradient is averaged over cp first, so nothing may overlap (the
        # flag then changes nothing, and must not change a bit)
        results = w.run(compare, _argv("tiny-llama", ["--context-parallel-size", "2"]), 1, 1,
                        timeout=900)
        assert (results[0][0][3]["cp_size"], results[0][0][3]["dp_size"]) == (2, 2)
        _check(results, "CP=2 x DP=2", dp_owned=False)
        assert all(s == [0] * ITERS for r in results for s in (r[0][2], r[1][2]))
