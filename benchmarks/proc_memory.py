"""This process's memory as /proc/self/status reports it (Linux), for the benchmarks' memory
figures: one field, and the peak of RssAnon (anonymous memory: tensors and buffers, not the
pages of memory-mapped files) sampled in a thread.

Imported by the scripts beside it (``python benchmarks/x.py`` puts this folder on sys.path).
"""
from __future__ import annotations

import threading


def status_mib(field: str = "RssAnon") -> float:
    """``field`` of /proc/self/status (VmRSS, RssAnon, VmHWM, ...) in MiB; NaN if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """The peak of RssAnon from construction to :meth:`stop` (or the end of a ``with`` block),
    sampled every 2 ms in a thread, and once more at each end so a short span still counts."""

    def __init__(self) -> None:
        self.peak, self._stop = status_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, status_mib())

    def stop(self) -> float:
        """End the sampling; return the peak in MiB (also left in ``self.peak``)."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_mib())
        return self.peak

    def __enter__(self) -> "AnonPeak":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
