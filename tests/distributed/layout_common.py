"""What the layout-equivalence tests of every model family share (test_layouts.py: GPT,
test_bert_layouts.py: BERT, test_t5_layouts.py: T5, test_moe_ep_layouts.py: MoE, ...): their
``data`` fixture, runs of ``megalite train`` in a worker group (:func:`layout_results`, also for
the single-process reference curves), the tolerance checks of a loss curve against the
single-process one (their reasons are in those modules' docstrings), and rewinding ``latest`` to
an earlier checkpoint for resume tests."""
from __future__ import annotations

import os
from typing import Callable


def data_fixture(tokens: str, tokenizer: str):
    """A test module's ``data`` fixture: (token-file prefix, tokenizer file), the values of the
    session fixtures named ``tokens`` and ``tokenizer`` (tests/conftest.py). Use it as
    ``data = data_fixture("corpus_token_dataset", "sp_model")``."""
    import pytest  # not at the top: the workers import this module too

    @pytest.fixture(scope="module", name="data")
    def data(request) -> tuple[str, str]:
        return request.getfixturevalue(tokens), request.getfixturevalue(tokenizer)
    return data


def train_many(runs: list[list[str]]) -> list[list[float]]:
    """The loss curve of ``megalite train`` for each argv of ``runs``, one after the other (run
    in every worker: top level, pickled by reference)."""
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import Trainer

    return [Trainer(parse_train_args(argv)).train().losses for argv in runs]


def check_curve(curve: list[float], ref: list[float], iters: int, what: str) -> None:
    """Iteration 1 within 1e-5 relative of ``ref``, every later one within 1e-4."""
    assert len(curve) == len(ref) == iters, what
    rel = [abs(a - b) / abs(b) for a, b in zip(curve, ref)]
    assert rel[0] <= 1e-5, f"{what}: iteration 1 loss {curve[0]} vs {ref[0]} (rel {rel[0]:.2e})"
    worst = max(range(iters), key=lambda i: rel[i])
    assert rel[worst] <= 1e-4, (f"{what}: iteration {worst + 1} loss {curve[worst]} vs "
                                f"{ref[worst]} (rel {rel[worst]:.2e})")


def check_bf16(curve: list[float], fp32: list[float], tolerance: float, what: str) -> None:
    """A bf16 curve learns (falls by 0.2) and stays within ``tolerance`` relative of fp32's."""
    assert curve[-1] < curve[0] - 0.2, f"{what}: bf16 did not learn: {curve}"
    rel = max(abs(a - b) / b for a, b in zip(curve, fp32))
    assert rel < tolerance, f"{what}: bf16 deviates from fp32 by {rel:.2e} relative"


def rewind_latest(ps, directory: str, iteration: int) -> None:
    """Point ``directory``'s ``latest`` at ``iteration`` (collective: every rank calls it), as
    if the run had been killed right after that save."""
    import torch.distributed as dist

    dist.barrier()
    if ps.rank == 0:
        with open(os.path.join(directory, "latest"), "w") as f:
            f.write(f"iter_{iteration:07d}\n")
    dist.barrier()


def layout_results(world: int, runs: list[list[str]], timeout: float = 1500,
                   fn: Callable[[list[list[str]]], list] = train_many) -> list:
    """``fn(runs)`` in one group of ``world`` processes (by default :func:`train_many`: the
    loss curves of ``runs``), after checking that every rank returned the same (the same
    global-batch losses). ``fn`` must be top level, like :func:`train_many`."""
    from harness import DistributedWorkers

    with DistributedWorkers(world) as workers:
        results = workers.run(fn, runs, timeout=timeout)
    for rank_curves in results:
        assert rank_curves == results[0]
    return results[0]


def train_and_rewind(argv: list[str], tp: int, pp: int, directory: str | None = None,
                     rewind_to: int | None = None, ep: int = 1, cp: int = 1) -> list[float]:
    """One ``megalite train`` run in a (tp, pp, ep, cp) layout of the worker group (top level, for
    ``DistributedWorkers.run``); with ``rewind_to``, ``directory``'s ``latest`` is then pointed
    at that iteration (:func:`rewind_latest`). Returns the loss curve."""
    from megalite.distributed.parallel_state import ParallelState
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import pretrain

    ps = ParallelState.build(tp, pp, context_parallel_size=cp, expert_model_parallel_size=ep)
    losses = pretrain(parse_train_args(argv), ps).losses
    if rewind_to is not None:
        rewind_latest(ps, directory, rewind_to)
    return losses
