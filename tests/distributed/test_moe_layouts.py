"""MoE models train to the single process's loss curve under TP2 (+SP), PP2, DP2 and ZeRO-1
(the non-expert-parallel layouts; expert parallelism has its own tests).

The model: tiny-llama with 4 experts of width 48, top-2 (renormalised), the load-balancing
loss (1e-2) and the z-loss (1e-3) on, so the router's gradients and the attached losses are
part of what must agree; the routed-only variant with Qwen3-MoE's query/key norms
(``--qk-layernorm``: replicated weights whose gradients the optimizers sum over tp); a variant
with a gated shared expert and every other layer dense (``--moe-layer-freq 2``). Tolerances as in test_layouts.py (1e-5 relative at iteration 1,
1e-4 after: fp32 summation order only). Routing is the same in every layout: the router runs
in fp32 on the same tokens with the same weights, and a route can only change where two
experts' scores are within rounding of each other, which these runs do not hit (a flipped
route would move the loss far beyond 1e-4 and fail the test).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from layout_common import check_curve, layout_results

CONFIGS = Path(__file__).resolve().parents[2] / "megalite" / "configs"
ITERS = 6
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48",
       "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3", "--disable-bias-linear"]
VARIANTS = {
    "routed": MOE + ["--qk-layernorm"],
    "shared": MOE + ["--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate",
                     "--moe-layer-freq", "2"],
}
LAYOUTS = [(2, 1, []), (2, 1, ["--sequence-parallel"]), (1, 2, []), (1, 1, []),
           (1, 1, ["--zero-stage", "1"])]


def _argv(variant: str, tp: int, pp: int, extra: list[str]) -> list[str]:
    return ["--config", str(CONFIGS / "tiny-llama.yaml"), "--mock-data", "--vocab-size", "500",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32",
            "--train-iters", str(ITERS), "--lr", "2e-3", "--min-lr", "2e-4",
            "--lr-warmup-iters", "2", "--eval-iters", "0", "--log-interval", "3",
            "--seed", "1234", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp)] + VARIANTS[variant] + extra


@pytest.mark.timeout(1500)
def test_moe_layouts_match_single_process():
    ref = layout_results(1, [_argv(v, 1, 1, []) for v in VARIANTS])
    for variant, curve in zip(VARIANTS, ref):   # random tokens: the loss moves, not falls
        assert len(set(curve)) == ITERS, f"{variant}: the steps changed nothing: {curve}"
    cases = [(v, tp, pp, extra) for v in VARIANTS for tp, pp, extra in LAYOUTS]
    curves = layout_results(2, [_argv(*case) for case in cases])
    for (variant, tp, pp, extra), curve in zip(cases, curves):
        check_curve(curve, ref[list(VARIANTS).index(variant)], ITERS,
                    f"{variant} tp={tp} pp={pp} {' '.join(extra)}")
