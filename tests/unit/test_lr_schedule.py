"""LRSchedule at hand-computed iterations for each decay style; the edges of warmup and decay.

Reference values are worked out by hand from the formulas in megalite/optim/lr_schedule.py
(cos(0.2 pi) = 0.80901699, cos(0.1 pi) = 0.95105652); compared to 1e-12 absolute, far below any
real difference and far above float64 rounding of these few operations."""
from __future__ import annotations

import pytest

from megalite.config import OptimConfig
from megalite.errors import MegaliteError
from megalite.optim.lr_schedule import LRSchedule

# lr 1.0, min_lr 0.1, 4 warmup iterations, decay ends at iteration 14 (10 decay iterations).
CASES = {
    "cosine": {1: 0.25, 2: 0.5, 4: 1.0,
               6: 0.1 + 0.9 * (1 + 0.80901699437494745) / 2,   # r = 0.2
               9: 0.55,                                         # r = 0.5: half way
               12: 0.1 + 0.9 * (1 - 0.80901699437494745) / 2,  # r = 0.8
               14: 0.1, 15: 0.1, 1000: 0.1},
    "linear": {1: 0.25, 3: 0.75, 4: 1.0, 6: 0.82, 9: 0.55, 13: 0.19, 14: 0.1, 100: 0.1},
    "constant": {1: 0.25, 4: 1.0, 5: 1.0, 14: 1.0, 1000: 1.0},
}


@pytest.mark.parametrize("style", sorted(CASES))
def test_hand_computed_values(style):
    s = LRSchedule(1.0, 0.1, 4, 14, style)
    for it, expected in CASES[style].items():
        assert s.lr_at(it) == pytest.approx(expected, abs=1e-12), (style, it)


def test_no_warmup_starts_just_below_peak():
    s = LRSchedule(2.0, 0.0, 0, 10, "cosine")
    assert s.lr_at(1) == pytest.approx(2.0 * (1 + 0.95105651629515357) / 2, abs=1e-12)
    assert LRSchedule(2.0, 0.0, 0, 10, "linear").lr_at(1) == pytest.approx(1.8, abs=1e-12)
    assert LRSchedule(2.0, 0.0, 0, 10, "constant").lr_at(1) == 2.0


def test_warmup_equal_to_decay_drops_to_min_after():
    s = LRSchedule(1.0, 0.1, 5, 5, "cosine")
    assert s.lr_at(5) == 1.0 and s.lr_at(6) == 0.1


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_monotone_after_warmup_and_bounded(style):
    s = LRSchedule(3e-4, 3e-5, 10, 100, style)
    values = [s.lr_at(t) for t in range(1, 120)]
    assert all(a < b for a, b in zip(values[:9], values[1:10]))          # warmup rises
    assert all(a > b for a, b in zip(values[9:99], values[10:100]))      # strictly decays
    assert all(3e-5 <= v <= 3e-4 for v in values[9:])
    assert values[9] == 3e-4 and values[99:] == [3e-5] * 20


@pytest.mark.parametrize("args, match", [
    ((1.0, 0.0, 0, 10, "exponential"), "--lr-decay-style"),
    ((1.0, 2.0, 0, 10, "cosine"), "--min-lr"),
    ((1.0, 0.0, -1, 10, "cosine"), "--lr-warmup-iters"),
    ((1.0, 0.0, 0, 0, "cosine"), "decay length"),
    ((1.0, 0.0, 11, 10, "linear"), "--lr-warmup-iters 11 exceeds"),
])
def test_bad_arguments(args, match):
    with pytest.raises(MegaliteError, match=match):
        LRSchedule(*args)


def test_steps_count_from_zero():
    """lr_at(t) is the rate after t steps (Megatron-LM's scheduler after t increments): the
    first step warms up from the warmup start, or starts at the peak without a warmup."""
    assert LRSchedule(1.0, 0.0, 2, 10).lr_at(0) == 0.0
    assert LRSchedule(1.0, 0.0, 2, 10, init_lr=0.25).lr_at(0) == 0.25
    assert LRSchedule(1.0, 0.0, 0, 10).lr_at(0) == 1.0
    with pytest.raises(MegaliteError, match="count from 0"):
        LRSchedule(1.0, 0.0, 2, 10).lr_at(-1)


def test_built_from_optim_config_defaults():
    o = OptimConfig()
    s = LRSchedule(o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters or 100, o.lr_decay_style)
    assert s.lr_at(1) < o.lr and s.lr_at(100) == o.min_lr == 0.0
