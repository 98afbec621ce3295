"""Context parallelism in the trainer: the loss curve of every CP layout is the single process's
(the GPT pattern of test_layouts.py, same data, seed and tolerances).

For the built-in corpus (SentencePiece tokens) and a fixed seed, 10 iterations of ``megalite
train`` under CP=2, CP=4, CP=2 x TP=2 (with sequence parallelism), CP=2 x PP=2, CP=2 x DP=2
and CP=2 with ZeRO-1 give the single-process run's global-batch loss at every iteration:

* iteration 1 within 1e-5 relative: identical weights; the ring merges the attention's softmax
  blocks in another order and the CP ranks' gradients are averaged, which moves a loss by
  ~1e-7 (fp32).
* iterations 2..10 within 1e-4 relative: AdamW's 1/sqrt(v) magnifies the ~1e-7 relative
  gradient differences of near-zero entries (the bound of every layout test).

CP=2 also runs with full activation recompute (the ring runs again in the recomputed forward),
CP=2 x PP=2 interleaved (2 virtual stages), and in bf16 (must train and stay within 3e-2 of
the fp32 curve, GPT's bf16 bound).

Each layout runs with and without document masking (``--reset-position-ids
--reset-attention-mask --eod-mask-loss``: the ring attends inside each document and skips the
blocks of other documents, the loss divides by the whole sequence's count of loss tokens),
against the single process with the same flags.

Both recipes run: classic (learned absolute positions, which CP must take at the tokens'
global indices, tied embeddings) and LLaMA (RoPE at the global positions, GQA: 4 query heads
over 2 key/value groups travel the ring as 2 groups). To keep CI's time, each layout runs its
two variants under different recipes, alternating from layout to layout (pairwise: every
layout in both variants, every recipe in both variants at every world size) rather than the
whole recipe x variant product. Each world size runs all its layouts in one group of
processes; the shapes are the tiny configs' (CPU gloo runs are slow).
"""
from __future__ import annotations

import pytest

from layout_common import check_bf16, check_curve, data_fixture, layout_results
from test_layouts import DOC_FLAGS, ITERS, RECIPES, _argv

# (tp, pp, cp, extra flags) by world size; dp = world / (tp * pp * cp).
LAYOUTS = {
    2: [(1, 1, 2, []), (1, 1, 2, ["--zero-stage", "1"]),
        (1, 1, 2, ["--recompute-granularity", "full"])],
    4: [(1, 1, 4, []), (2, 1, 2, ["--sequence-parallel"]), (1, 2, 2, []), (1, 1, 2, []),
        (1, 2, 2, ["--num-layers-per-virtual-pipeline-stage", "1"])],       # interleaved
}
BF16_REL = 3e-2   # bf16 against the fp32 curve: test_layouts.py's bound and its reason


VARIANTS = {"causal": [], "documents": DOC_FLAGS}


def _cp_argv(recipe: str, variant: str, data, tp: int, pp: int, cp: int,
             extra: list[str]) -> list[str]:
    prefix, sp = data
    return _argv(recipe, prefix, sp, tp, pp,
                 ["--context-parallel-size", str(cp)] + VARIANTS[variant] + extra)


data = data_fixture("corpus_token_dataset", "sp_model")


@pytest.fixture(scope="module")
def reference(data):
    """Single-process fp32 loss curves of both recipes, with and without documents."""
    keys = [(r, v) for r in RECIPES for v in VARIANTS]
    curves = layout_results(1, [_cp_argv(r, v, data, 1, 1, 1, []) for r, v in keys],
                            timeout=600)
    return dict(zip(keys, curves))


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_cp_layouts_match_single_process(world, data, reference):
    for recipe in RECIPES:       # the samples do hold several documents
        assert reference[recipe, "causal"] != reference[recipe, "documents"], recipe
    recipes = list(RECIPES)
    cases = [(recipes[(i + j) % len(recipes)], variant, *layout)
             for i, layout in enumerate(LAYOUTS[world]) for j, variant in enumerate(VARIANTS)]
    assert {(r, v) for r, v, *_ in cases} == {(r, v) for r in RECIPES for v in VARIANTS}
    bf16 = [(recipe, "causal", 1, 1, 2, ["--bf16"]) for recipe in RECIPES] if world == 2 else []
    curves = layout_results(world, [_cp_argv(*case[:2], data, *case[2:])
                                    for case in cases + bf16], timeout=1200)
    for (recipe, *_), curve in zip(bf16, curves[len(cases):]):
        check_bf16(curve, reference[recipe, "causal"], BF16_REL, f"{recipe} CP=2 bf16")
    for (recipe, variant, tp, pp, cp, extra), curve in zip(cases, curves):
        what = (f"{recipe} {variant} CP={cp} TP={tp} PP={pp} DP={world // (tp * pp * cp)} "
                f"{' '.join(extra)}")
        check_curve(curve, reference[recipe, variant], ITERS, what)
