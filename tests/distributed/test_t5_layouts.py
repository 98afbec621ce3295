"""T5's loss curve is the same for every layout (the GPT pattern of test_layouts.py).

For fixed data (the built-in corpus split into sentences, WordPiece tokens, megatron-core's T5
span-corruption samples with 100 sentinels) and seed, 10 iterations of ``megalite train
--model-type t5`` (configs/tiny-t5.yaml: 4 + 4 layers, relative position buckets, gated GELU,
untied; padded encoder and decoder inputs) under TP=2, TP=2 with sequence parallelism, DP=2,
TP=2 x DP=2 and ZeRO-1/2/3 give the single-process run's global-batch loss at every iteration:

* iteration 1 within 1e-5 relative: identical weights (layout-independent init), only the
  fp32 summation order differs (~1e-7).
* iterations 2..10 within 1e-4 relative: AdamW's 1/sqrt(v) magnifies the ~1e-7 relative
  gradient differences of near-zero entries; over 10 steps the drift stays well below 1e-4.

A second recipe (post-norm, LayerNorm, ReLU: the original Transformer's layer with T5's
positions) runs under TP=2 with sequence parallelism and TP=2 x DP=2. bf16 (single process and
ZeRO-1/2/3 at DP=2) must train and stay within 3e-2 relative of the fp32 curve: bf16 keeps 8
bits of mantissa, ~4e-3 relative per rounding, accumulated over 8 layers and 10 steps (the
bound of GPT's and BERT's tests). Pipeline parallelism is refused at start-up
(test_t5_training.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from layout_common import check_bf16, check_curve, layout_results

CONFIG = str(Path(__file__).resolve().parents[2] / "megalite" / "configs" / "tiny-t5.yaml")
ITERS = 10
VARIANTS = {"v1.1": [], "post-relu": ["--norm-placement", "post", "--activation", "relu",
                                      "--normalization", "LayerNorm"]}
BF16_REL = 3e-2

# (variant, tp, extra flags) by world size; dp = world / tp.
LAYOUTS = {
    2: [("v1.1", 2, []), ("v1.1", 2, ["--sequence-parallel"]), ("v1.1", 1, []),
        ("v1.1", 1, ["--zero-stage", "1"]), ("v1.1", 1, ["--zero-stage", "2"]),
        ("v1.1", 1, ["--zero-stage", "3"]), ("post-relu", 2, ["--sequence-parallel"])],
    4: [("v1.1", 2, []), ("post-relu", 2, [])],
}
BF16_LAYOUTS = [["--zero-stage", "1"], ["--zero-stage", "2"], ["--zero-stage", "3"]]


def _argv(variant: str, prefix: str, vocab: str, tp: int, extra: list[str]) -> list[str]:
    """``megalite train`` flags of one run: the data, 10 iterations of 8 samples (64 encoder,
    32 decoder tokens), the variant's recipe, the layout."""
    data = ["--data-path", prefix, "--split", "98,2,0", "--tokenizer-type",
            "BertWordPieceLowerCase", "--vocab-file", vocab, "--vocab-extra-ids", "100"]
    run = ["--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "64",
           "--decoder-seq-length", "32", "--train-iters", str(ITERS), "--lr", "2e-3",
           "--min-lr", "2e-4", "--lr-warmup-iters", "2", "--eval-iters", "0",
           "--log-interval", "100", "--seed", "1234"]
    return (["--config", CONFIG, *data, *run, *VARIANTS[variant],
             "--tensor-model-parallel-size", str(tp), *extra])


@pytest.fixture(scope="module")
def single(wordpiece_sentence_dataset, wordpiece_vocab):
    """(data, the single-process fp32 curve of each variant, the v1.1 bf16 curve)."""
    data = (wordpiece_sentence_dataset, wordpiece_vocab)
    runs = [_argv(v, *data, 1, []) for v in VARIANTS] + [_argv("v1.1", *data, 1, ["--bf16"])]
    *fp32, bf16 = layout_results(1, runs, timeout=900)
    return data, dict(zip(VARIANTS, fp32)), bf16


def test_single_process_learns(single):
    _, fp32, bf16 = single
    assert all(c[-1] < c[0] - 0.2 for c in fp32.values()), fp32
    assert fp32["v1.1"] != fp32["post-relu"]     # the recipes are different models
    check_bf16(bf16, fp32["v1.1"], BF16_REL, "T5 bf16, one process")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_layouts_match_single_process(world, single):
    data, fp32, _ = single
    runs = [(f"T5 {v} TP={tp} DP={world // tp} {' '.join(x)}", fp32[v], _argv(v, *data, tp, x))
            for v, tp, x in LAYOUTS[world]]
    bf16 = [_argv("v1.1", *data, 1, ["--bf16"] + x) for x in BF16_LAYOUTS] if world == 2 else []
    curves = layout_results(world, [argv for _, _, argv in runs] + bf16)
    for (what, ref, _), curve in zip(runs, curves):
        check_curve(curve, ref, ITERS, what)
    for extra, curve in zip(BF16_LAYOUTS, curves[len(runs):]):
        check_bf16(curve, fp32["v1.1"], BF16_REL, f"T5 bf16 DP=2 {' '.join(extra)}")
