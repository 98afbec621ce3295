"""``--compile``: the compiled model trains like the eager one, and what cannot be compiled is
refused at start-up.

Tolerance. Inductor generates its own fused loops for the elementwise work and the reductions
(norm statistics, softmax sums), so fp32 sums are re-associated: the first iteration's loss and
gradient norm agree to 1e-5 relative (re-association moves them by ~1e-7), later iterations to
1e-4 (AdamW's division by sqrt(v) magnifies the ~1e-7 differences of near-zero gradient
entries; the layout tests' bounds, tests/distributed/layout_common.py). Dropout is on (0.1 on
the hidden states and the attention probabilities) and every layer is recomputed: dropout runs
eagerly under --compile, so the masks, and the recompute's replay of them, are the eager ones;
a compiled mask would differ completely and miss these bounds by orders of magnitude.

Compiling costs tens of seconds to minutes on the shared 2-core machine (this test, cold
inductor cache in /tmp/torchinductor_$USER: 456 s wall at a load of ~25, 44 s of CPU in the
test process, the C++ builds run in inductor's worker processes; warm: 34 s at a load of ~14):
one model, four iterations. The TP2+SP and PP2 layouts: tests/distributed/test_compile_layouts.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from megalite.errors import ConfigError
from megalite.training.compile import compile_seconds
from megalite.training.prepare import parse_train_args
from megalite.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "megalite" / "configs"
ITERS = 4
ARGV = ["--config", str(CONFIGS / "tiny-llama.yaml"), "--mock-data", "--num-layers", "2",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
        "--train-iters", str(ITERS), "--lr", "2e-3", "--lr-warmup-iters", "1",
        "--eval-iters", "0", "--log-interval", "100", "--hidden-dropout", "0.1",
        "--attention-dropout", "0.1", "--recompute-granularity", "full"]


def _run(argv: list[str]) -> tuple[list[float], list[float]]:
    trainer = Trainer(parse_train_args(argv))
    steps = [trainer.train_step() for _ in range(ITERS)]
    return [loss for loss, _ in steps], [float(s.grad_norm) for _, s in steps]


def _check(got: list[float], ref: list[float], what: str) -> None:
    rel = [abs(a - b) / abs(b) for a, b in zip(got, ref)]
    assert rel[0] <= 1e-5, f"{what} at iteration 1: {got[0]} vs eager {ref[0]}"
    assert max(rel) <= 1e-4, f"{what}: compiled {got} vs eager {ref}"


def test_compiled_training_matches_eager(capsys):
    eager_losses, eager_norms = _run(ARGV)
    before = compile_seconds()
    losses, norms = _run(ARGV + ["--compile"])
    assert compile_seconds() > before, "nothing was compiled"
    _check(losses, eager_losses, "loss")
    _check(norms, eager_norms, "gradient norm")
    assert losses[-1] < losses[0]                       # it trains
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("--compile:")]
    assert len(lines) == 1 and "s compiling" in lines[0], lines   # reported once


@pytest.mark.parametrize("argv, flag", [
    (["--config", str(CONFIGS / "tiny-bert.yaml"), "--mock-data"], "--model-type bert"),
    (["--config", str(CONFIGS / "tiny-t5.yaml"), "--mock-data"], "--model-type t5"),
    (ARGV + ["--zero-stage", "3"], "--zero-stage 3"),
    (ARGV + ["--num-experts", "4"], "--num-experts"),
    (ARGV[:ARGV.index("--hidden-dropout")] + ["--context-parallel-size", "2"],  # no dropout
     "--context-parallel-size"),
])
def test_refused_layouts_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match="--compile") as e:
        parse_train_args(argv + ["--compile"])
    assert flag in str(e.value) and "\n" not in str(e.value)
