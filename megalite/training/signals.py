"""Stopping a run cleanly: preemption signals and a wall-clock budget, agreed on by all ranks.

SLURM warns a job before its time limit (``#SBATCH --signal=B:USR1@300``) and sends SIGTERM
when it preempts or cancels it. Either may reach only some ranks (``B:`` signals the batch
shell alone; a node may be signalled before another). So a handler only *records* the signal;
once per iteration, after the optimizer step, every rank's votes (:meth:`StopMonitor.local_votes`:
a signal arrived here, ``--exit-duration-in-mins`` elapsed here) are summed over the world in
the training loop's one collective with the loss, and read back during the next iteration
(:mod:`megalite.training.trainer`); :meth:`StopMonitor.should_stop` is the same agreement as a
collective of its own. Every rank gets the same answer at the same iteration, saves the
checkpoint (a collective) and leaves the loop; ``megalite train`` then exits with
:data:`EXIT_STOPPED`.

Requeue policy (decided here, implemented in ``launch/slurm/*.sbatch``): Python never calls
``scontrol``. The batch script traps the signal, forwards it to the training step, and when
the step exits with :data:`EXIT_STOPPED` runs ``scontrol requeue $SLURM_JOB_ID`` (the job
must be submitted with ``--requeue``). The script sees the outcome of *all* ranks (one
place, one requeue), the same logic serves the srun and torchrun variants, and a run that
finished before the signal was handled is not requeued.
"""
from __future__ import annotations

import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

__all__ = ["EXIT_STOPPED", "STOP_SIGNALS", "StopMonitor"]

EXIT_STOPPED = 75
"""Exit status of ``megalite train`` after a signal/time-limit stop with a checkpoint saved
(75 = EX_TEMPFAIL: "try again later"); the batch scripts requeue on it."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Signals that ask the run to checkpoint and stop."""

_SIGNAL_BIT, _TIME_BIT = 1, 2


class StopMonitor:
    """Records stop signals and checks the time budget; ``should_stop`` is collective.

    Use as a context manager around the training loop (handlers are installed on entry and the
    previous ones restored on exit). Handlers can only be installed in the main thread; in
    another thread the monitor still enforces the time budget.

    Args:
        exit_duration_mins: stop once this many minutes have passed since ``start_time``
            (None: no limit).
        group: process group to agree over (None: the default world group); unused when
            torch.distributed is not initialized.
        device: device of the flag tensor (CUDA for NCCL, CPU for gloo).
        start_time: ``time.monotonic()`` the budget counts from (default: construction).
    """

    def __init__(self, exit_duration_mins: float | None = None, group=None,
                 device: torch.device | str = "cpu", start_time: float | None = None):
        self.exit_duration_s = None if exit_duration_mins is None else exit_duration_mins * 60.0
        self.group = group
        self.device = torch.device(device)
        self.start_time = time.monotonic() if start_time is None else start_time
        self.received: int | None = None
        """Number of the last stop signal this process received, None if none."""
        self._previous: dict[int, object] = {}

    # ---- handlers ----------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record: the loop acts at the next iteration boundary, where every rank can agree.
        self.received = signum

    def __enter__(self) -> "StopMonitor":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
                # SA_RESTART: a blocking system call in C++ (a gloo/NCCL socket read in the
                # middle of a collective) resumes instead of failing with EINTR; the Python
                # handler still runs at the next bytecode boundary.
                signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # ---- the per-iteration check -------------------------------------------------------------
    def local_flags(self) -> int:
        """This rank's reasons to stop, as bits (no communication)."""
        flags = _SIGNAL_BIT if self.received is not None else 0
        if (self.exit_duration_s is not None
                and time.monotonic() - self.start_time >= self.exit_duration_s):
            flags |= _TIME_BIT
        return flags

    def local_votes(self) -> list[float]:
        """This rank's ``[signal, time]`` stop votes (1.0 or 0.0), for a caller that sums them
        over the ranks in a collective of its own (:meth:`decide`)."""
        flags = self.local_flags()
        return [float(bool(flags & _SIGNAL_BIT)), float(bool(flags & _TIME_BIT))]

    @staticmethod
    def decide(signal_votes: float, time_votes: float) -> str | None:
        """The reason to stop from the world sums of :meth:`local_votes` (the same rule as
        :meth:`should_stop`: a signal anywhere wins over the time budget)."""
        return "signal" if signal_votes > 0 else "time" if time_votes > 0 else None

    def should_stop(self) -> str | None:
        """Collective over the group: the reason every rank stops now, or None to go on.

        One all-reduce (MAX) of one int32 per call: every rank must call it at the same
        iteration. Returns "signal" (some rank received SIGUSR1/SIGTERM; wins over time) or
        "time" (some rank's --exit-duration-in-mins elapsed).
        """
        flags = self.local_flags()
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([flags], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flags = int(t.item())
            # MAX of bit sets is not their OR; signal (1) and time (2) on different ranks
            # gives 2, i.e. "time": the run stops either way, and only the message differs.
        if flags & _SIGNAL_BIT:
            return "signal"
        if flags & _TIME_BIT:
            return "time"
        return None
