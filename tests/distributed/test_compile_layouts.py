"""``--compile`` under tensor parallelism with sequence parallelism, under pipeline
parallelism and under data parallelism with DeepSpeed ZeRO-2: the loss curve equals the eager
single-process one.

Under TP+SP each layer's compiled graphs stop at the sequence all-gathers and reduce-scatters
(run eagerly, :mod:`megalite.parallel.comm`), so this checks that the compiled local math
between them, the eager collectives and their backward fit together; under PP the first stage
compiles only layers, the last the head too; under ZeRO-2 DeepSpeed's gradient hooks take the
compiled backward's gradients. Tolerances as every layout test
(:func:`layout_common.check_curve`: iteration 1 within 1e-5 relative, later ones within 1e-4):
compiled fp32 re-associates sums like TP's split reductions do (~1e-7), see
tests/unit/test_compile.py.

The layouts run in one group of 2 processes, one after the other; compiling dominates the time
(measured on the shared 2-core machine: 452 s wall at a load of ~30 with a cold inductor cache
and the first two layouts; 53 s with all three at a load of ~11 with a warm one, in
/tmp/torchinductor_$USER; the layer graphs of the PP and ZeRO runs are the single process's).
"""
from __future__ import annotations

from pathlib import Path

from layout_common import check_curve, layout_results, train_many

CONFIGS = Path(__file__).resolve().parents[2] / "megalite" / "configs"
ITERS = 4
ARGV = ["--config", str(CONFIGS / "tiny-llama.yaml"), "--mock-data", "--num-layers", "2",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
        "--train-iters", str(ITERS), "--lr", "2e-3", "--lr-warmup-iters", "1",
        "--eval-iters", "0", "--log-interval", "100"]


def test_compiled_tp_sp_pp_and_zero2_match_eager_single_process():
    (reference,) = train_many([ARGV])
    layouts = {"TP2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               "PP2": ["--pipeline-model-parallel-size", "2"],
               "DP2 ZeRO-2": ["--zero-stage", "2"]}
    curves = layout_results(2, [ARGV + flags + ["--compile"] for flags in layouts.values()])
    for (name, _), curve in zip(layouts.items(), curves):
        check_curve(curve, reference, ITERS, f"--compile {name}")
