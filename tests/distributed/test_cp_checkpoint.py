"""Checkpoints do not depend on the context-parallel size (the weights are not split by CP):
a GPT run (tiny LLaMA recipe, 2 gloo processes) saved at iteration 3 and resumed

* under its own layout (CP=2, or DP=2): iterations 4-6 are those of the uninterrupted run,
  float for float (weights, optimizer state, RNG streams and the data position restored);
* at another CP size (saved at CP=2, resumed at DP=2 with CP=1, and the other way round):
  within 1e-4 relative of that uninterrupted run: the optimizer state follows by parameter
  name, and the two layouts differ only in the fp32 summation order (~1e-7, magnified by
  AdamW as in the layout tests); a lost or misplaced optimizer state moves the loss by far more.
"""
from __future__ import annotations

import pytest

from harness import DistributedWorkers
from layout_common import train_and_rewind
from test_layouts import RECIPES, _argv

LAYOUTS = {"cp2": 2, "dp2": 1}     # name -> context-parallel size in a world of 2


@pytest.fixture(scope="module")
def group():
    with DistributedWorkers(2, timeout=600) as w:
        yield w


def _run(group, data, cp: int, *extra: str) -> list[float]:
    prefix, sp = data
    argv = _argv("llama", prefix, sp, 1, 1, ["--context-parallel-size", str(cp),
                                              "--train-iters", "6", *extra])
    return group.run(train_and_rewind, argv, 1, 1, None, None, cp)[0]


@pytest.fixture(scope="module")
def saved(group, corpus_token_dataset, sp_model, tmp_path_factory):
    """Per layout: (its directory with ``latest`` at iteration 3, its 6 losses)."""
    data = (corpus_token_dataset, sp_model)
    out = {}
    for name, cp in LAYOUTS.items():
        directory = str(tmp_path_factory.mktemp(name) / "run")
        prefix, sp = data
        argv = _argv("llama", prefix, sp, 1, 1, ["--context-parallel-size", str(cp),
                                                  "--train-iters", "6", "--save", directory,
                                                  "--save-interval", "3"])
        full = group.run(train_and_rewind, argv, 1, 1, directory, 3, cp)[0]
        assert len(full) == 6
        out[name] = (directory, full)
    return data, out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("saved_at,resumed_at", [("cp2", "cp2"), ("dp2", "dp2"),
                                                 ("cp2", "dp2"), ("dp2", "cp2")])
def test_resume_at_another_cp_size(group, saved, saved_at, resumed_at):
    assert "llama" in RECIPES
    data, runs = saved
    directory, full = runs[saved_at]
    losses = _run(group, data, LAYOUTS[resumed_at], "--load", directory)
    assert len(losses) == 3
    if saved_at == resumed_at:
        assert losses == full[3:], (full, losses)
        return
    for a, b in zip(full[3:], losses, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (full, losses)
