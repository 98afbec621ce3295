"""``--compile`` under tensor parallelism with sequence parallelism, under pipeline
parallelism, under data parallelism with DeepSpeed ZeRO-2 and with packed documents: the loss
curve equals the eager single-process one (with the same documents).

Under TP+SP each layer's compiled graphs stop at the sequence all-gathers and reduce-scatters
(run eagerly, :mod:`megalite.parallel.comm`), so this checks that the compiled local math
between them, the eager collectives and their backward fit together; under PP the first stage
compiles only layers, the last the head too; under ZeRO-2 DeepSpeed's gradient hooks take the
compiled backward's gradients; with packed documents the per-document attention runs eagerly
inside the compiled layers, whose rotary angles follow the per-token positions. Tolerances as
every layout test (:func:`layout_common.check_curve`: iteration 1 within 1e-5 relative, later
ones within 1e-4): compiled fp32 re-associates sums like TP's split reductions do (~1e-7), see
tests/unit/test_compile.py.

The layouts run in one group of 2 processes, one after the other; compiling dominates the time
(measured on the shared 2-core machine: 452 s wall at a load of ~30 with a cold inductor cache
and the first two layouts; 91 s with all four at a load of ~8 with a warm one, in
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


# packed documents: mock samples hold NullTokenizer's eod id (255), so documents are cut
DOCS = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--reset-position-ids",
        "--reset-attention-mask", "--eod-mask-loss"]


def test_compiled_layouts_match_eager_single_process():
    plain, docs = train_many([ARGV, ARGV + DOCS])
    layouts = {"TP2+SP": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], plain),
               "PP2": (["--pipeline-model-parallel-size", "2"], plain),
               "DP2 ZeRO-2": (["--zero-stage", "2"], plain),
               "DP2 packed documents": (DOCS, docs)}
    curves = layout_results(2, [ARGV + flags + ["--compile"] for flags, _ in layouts.values()])
    assert docs != plain                                      # the documents change the curve
    for (name, (_, reference)), curve in zip(layouts.items(), curves):
        check_curve(curve, reference, ITERS, f"--compile {name}")
