"""BERT's loss curve is the same for every layout (the GPT pattern of test_layouts.py).

For fixed data (the built-in corpus split into sentences, WordPiece tokens, megatron-core's
BERT samples) and seed, 10 iterations of ``megalite train --model-type bert`` (tiny-bert:
4 layers, masked-LM + sentence-order loss) under TP=2, TP=2 with sequence parallelism, PP=2
(also interleaved, 2 virtual stages), DP=2, TP=2 x DP=2, TP=2 x PP=2 and ZeRO-1/2/3 give the single-process run's global-batch loss
at every iteration:

* iteration 1 within 1e-5 relative: identical weights (layout-independent init), only the
  fp32 summation order differs (~1e-7).
* iterations 2..10 within 1e-4 relative: AdamW's 1/sqrt(v) magnifies the ~1e-7 relative
  gradient differences of near-zero entries; over 10 steps the drift stays well below 1e-4.

Both norm placements run (pre: Megatron-LM's, post: the original BERT's, through TP+SP and PP),
and the model without the binary head (--bert-no-binary-head). bf16 (single process and
ZeRO-1/2/3 at DP=2) must train and stay within 3e-2 relative of the fp32 curve: bf16 keeps 8
bits of mantissa, ~4e-3 relative per rounding, accumulated over 4 layers and 10 steps (the
same bound as GPT's).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from layout_common import check_bf16, check_curve, data_fixture, layout_results

CONFIG = str(Path(__file__).resolve().parents[2] / "megalite" / "configs" / "tiny-bert.yaml")
ITERS = 10
VARIANTS = {"pre": [], "post": ["--norm-placement", "post"], "no-binary": ["--bert-no-binary-head"]}
BF16_REL = 3e-2

# (variant, tp, pp, extra flags) by world size; dp = world / (tp * pp).
LAYOUTS = {
    2: [("pre", 2, 1, []), ("pre", 2, 1, ["--sequence-parallel"]), ("pre", 1, 2, []),
        ("pre", 1, 1, []), ("pre", 1, 1, ["--zero-stage", "1"]),
        ("pre", 1, 1, ["--zero-stage", "2"]), ("pre", 1, 1, ["--zero-stage", "3"]),
        ("pre", 1, 2, ["--num-layers-per-virtual-pipeline-stage", "1"]),   # interleaved
        ("post", 2, 1, ["--sequence-parallel"]), ("post", 1, 2, []),
        ("no-binary", 2, 1, [])],
    4: [("pre", 2, 1, []), ("pre", 2, 2, []), ("post", 2, 1, [])],
}
BF16_LAYOUTS = [["--zero-stage", "1"], ["--zero-stage", "2"], ["--zero-stage", "3"]]


def _argv(variant, prefix, vocab, tp, pp, extra):
    return ["--config", CONFIG, "--data-path", prefix, "--split", "98,2,0",
            "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", vocab,
            "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "64",
            "--train-iters", str(ITERS), "--lr", "2e-3", "--min-lr", "2e-4",
            "--lr-warmup-iters", "2", "--eval-iters", "0", "--log-interval", "100",
            "--seed", "1234", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp)] + VARIANTS[variant] + extra


data = data_fixture("wordpiece_sentence_dataset", "wordpiece_vocab")


@pytest.fixture(scope="module")
def reference(data):
    """Single-process fp32 curves of every variant, and the bf16 one (pre-norm)."""
    prefix, vocab = data
    runs = [_argv(v, prefix, vocab, 1, 1, []) for v in VARIANTS]
    runs.append(_argv("pre", prefix, vocab, 1, 1, ["--bf16"]))
    curves = layout_results(1, runs, timeout=900)
    return dict(zip(VARIANTS, curves)), curves[-1]


def test_reference_learns(reference):
    fp32, bf16 = reference
    for variant, curve in fp32.items():
        assert curve[-1] < curve[0] - 0.2, f"{variant}: loss did not fall: {curve}"
    assert fp32["pre"] != fp32["post"]           # the placements are different models
    check_bf16(bf16, fp32["pre"], BF16_REL, "single process")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_layouts_match_single_process(world, data, reference):
    prefix, vocab = data
    fp32, _ = reference
    cases = LAYOUTS[world]
    runs = [_argv(v, prefix, vocab, tp, pp, extra) for v, tp, pp, extra in cases]
    if world == 2:
        runs += [_argv("pre", prefix, vocab, 1, 1, ["--bf16"] + extra) for extra in BF16_LAYOUTS]
    curves = layout_results(world, runs, timeout=1500)  # checks that the ranks agree
    for (variant, tp, pp, extra), curve in zip(cases, curves):
        what = f"BERT {variant} TP={tp} PP={pp} DP={world // (tp * pp)} {' '.join(extra)}"
        check_curve(curve, fp32[variant], ITERS, what)
    for extra, curve in zip(BF16_LAYOUTS, curves[len(cases):]):
        check_bf16(curve, fp32["pre"], BF16_REL, f"BERT bf16 DP=2 {' '.join(extra)}")
