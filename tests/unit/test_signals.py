"""Clean stops: SIGUSR1/SIGTERM and --exit-duration-in-mins end the run after the current
iteration with a checkpoint, all ranks at the same iteration, and the resumed run's losses are
bitwise those of an uninterrupted run (same layout, same process: identical arithmetic)."""
import os
import signal

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed

from megalite.training.prepare import parse_train_args
from megalite.training.signals import EXIT_STOPPED, STOP_SIGNALS, StopMonitor
from megalite.training.trainer import Trainer, pretrain

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "megalite", "configs", "tiny-gpt.yaml")


def _args(*extra):
    # --peak-tflops: skip measuring the CPU's peak for MFU (seconds on a loaded machine)
    return ["--config", CONFIG, "--mock-data", "--num-layers", "2", "--train-iters", "8",
            "--eval-iters", "0", "--log-interval", "100", "--lr-warmup-iters", "2",
            "--peak-tflops", "1", *extra]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two intra-op threads on two cores shared with other test processes run ~20x slower
    # than one (spinning threads wait for each other); the numbers do not depend on it here
    # since every compared run uses the same setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_signal_is_recorded_and_handlers_restored(sig):
    before = signal.getsignal(sig)
    with StopMonitor() as monitor:
        assert monitor.should_stop() is None
        os.kill(os.getpid(), sig)  # a real signal; the handler only records it
        assert monitor.received == sig
        assert monitor.should_stop() == "signal"
    assert signal.getsignal(sig) is before


def test_time_budget():
    import time

    assert StopMonitor(None).should_stop() is None
    assert StopMonitor(1.0).should_stop() is None  # one minute has not passed
    assert StopMonitor(1.0, start_time=time.monotonic() - 61).should_stop() == "time"


def _one_rank_signalled():
    """Only rank 1 receives SIGUSR1; every rank must decide to stop at the same call."""
    decisions = []
    with StopMonitor() as monitor:
        for step in range(4):
            if step == 2 and dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            decisions.append(monitor.should_stop())
    return decisions


def test_all_ranks_agree():
    results = run_distributed(_one_rank_signalled, 3, timeout=120)
    assert results == [[None, None, "signal", "signal"]] * 3


class _SignalAt(Trainer):
    """A trainer that sends itself a real SIGUSR1 right after iteration ``at``'s optimizer step,
    as SLURM would at an arbitrary moment of that iteration."""

    at = 3

    def _step(self):   # the loop's step, before its loss mean and stop votes are reduced
        out = super()._step()
        if self.iteration == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out


def test_signal_stop_then_resume_equals_uninterrupted(tmp_path):
    reference = pretrain(parse_train_args(_args()))
    assert reference.stopped is None and len(reference.losses) == 8

    save = str(tmp_path / "ckpt")
    first = _SignalAt(parse_train_args(_args("--save", save))).train()
    # the votes of iteration 3 are read during iteration 4 (trainer._loop): every rank stops
    # after iteration 4
    assert first.stopped == "signal" and first.iteration == 4
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000004"
    second = pretrain(parse_train_args(_args("--save", save, "--load", save)))
    assert second.stopped is None
    # bitwise: the same process, layout and arithmetic, and the checkpoint holds the RNG and
    # data position; any drift would mean the resume is not exact
    assert first.losses + second.losses == reference.losses


def test_exit_duration_stops_with_checkpoint_and_exit_status(tmp_path, capsys):
    from megalite.cli import main

    save = str(tmp_path / "ckpt")
    # 1e-9 minutes: elapsed at the first iteration's vote, read during the second; every
    # rank (here one) stops after it
    rc = main(["train", *_args("--save", save, "--exit-duration-in-mins", "1e-9")])
    assert rc == EXIT_STOPPED
    assert "stopping at iteration 2 (time)" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(save, "iter_0000002"))
    assert main(["train", *_args("--save", save, "--load", save)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(save, "iter_0000008"))
