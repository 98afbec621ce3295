"""Run a function in N real ``torch.distributed`` processes (gloo on CPU) from a test.

Two ways to use it::

    from harness import run_distributed, DistributedWorkers

    def check(tp):                       # top-level, so it can be pickled by reference
        ps = ParallelState.build(tensor_model_parallel_size=tp)
        ...
        return some_picklable_result     # tensors are fine

    results = run_distributed(check, 4, 2)      # one fresh group of 4 processes, then gone
    # or keep one group alive across several test cases (4 processes on 2 cores take ~5-10 s
    # to start, so tests share them):
    with DistributedWorkers(4) as workers:
        results = workers.run(check, 2)          # list indexed by global rank

Every process has already called ``torch.distributed.init_process_group("gloo")`` (through a file
store, so there is no port race) and has ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, unless
``init_process_group=False``: then the harness only sets those plus ``MASTER_ADDR``/``MASTER_PORT``
(a free port) and the function initializes itself (to test ``init_distributed``).

Failure behaviour, the reason this file exists: an exception on any rank is re-raised in the test
as ``DistributedTestError`` carrying every failed rank's traceback; a rank that dies or a group
that does not answer within ``timeout`` seconds (a deadlock in a collective) gets every process
killed and the test fails instead of hanging. After any failure the worker group is torn down and
the next ``run`` starts a fresh one, since a half-finished collective leaves the group unusable.
Each worker uses one intra-op thread: 4 processes share 2 cores.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

__all__ = ["DistributedTestError", "DistributedWorkers", "run_distributed", "free_port"]

# Starting N python+torch processes on a loaded 2-core machine can take a while: a fresh group
# gets this long to import torch and initialize before the first ``run``'s own timeout starts.
STARTUP_TIMEOUT_S = 120.0
# After one rank fails, how long its peers get to finish or fail on their own before all are killed.
FAILURE_GRACE_S = 10.0
_READY = -2  # task id of the "initialized" message each worker sends once


class DistributedTestError(AssertionError):
    """A rank raised, died, or the group timed out; the message holds every rank's story."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for env:// initialization)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    # torch.save pickles tensors by value into bytes. Putting tensors on a multiprocessing queue
    # directly would share them through file descriptors owned by the sender, which breaks when
    # the sender exits or is killed before the test reads them.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker_main(rank: int, world_size: int, env: dict, store_path: str | None,
                 tasks: "mp.Queue", results: "mp.Queue") -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if store_path is not None:
            dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                    world_size=world_size)
    except BaseException:  # report instead of leaving the test to time out
        results.put((rank, _READY, False, traceback.format_exc()))
        return
    results.put((rank, _READY, True, b""))
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test process died (e.g. SIGKILL): don't linger
                break
            continue
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            out = fn(*args, **kwargs)
            results.put((rank, task_id, True, _dumps(out)))
        except BaseException:
            results.put((rank, task_id, False, traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


class DistributedWorkers:
    """A group of ``world_size`` long-lived worker processes; ``run`` executes one function on all.

    Use as a context manager (or call ``close()``); ``run`` (re)starts the processes lazily.
    """

    def __init__(self, world_size: int, *, timeout: float = 300.0, init_process_group: bool = True,
                 env: dict[str, str] | None = None, failure_grace_s: float = FAILURE_GRACE_S):
        """``timeout``: seconds one ``run`` may take before all processes are killed.
        ``env``: extra environment variables for the workers.
        ``failure_grace_s``: after one rank failed, how long the others may still take."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.init_process_group = init_process_group
        self.env = dict(env or {})
        self.failure_grace_s = failure_grace_s
        self._ctx = mp.get_context("spawn")
        self._procs: list = []
        self._tasks: list = []
        self._results = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._next_task = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def _start(self) -> None:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="megalite-dist-")
        store = os.path.join(self._tmpdir.name, "store") if self.init_process_group else None
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "OMP_NUM_THREADS": "1", **self.env}
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            self._ctx.Process(target=_worker_main, name=f"megalite-rank{r}", daemon=True,
                              args=(r, self.world_size, env, store, self._tasks[r], self._results))
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def close(self, *, kill: bool = False) -> None:
        """Stop the workers (politely unless ``kill``); safe to call twice."""
        if not kill:
            for q in self._tasks:
                try:
                    q.put(None)
                except (ValueError, OSError):
                    pass
            deadline = time.monotonic() + 10.0
            for p in self._procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for q in [*self._tasks, self._results]:
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self._procs, self._tasks, self._results = [], [], None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "DistributedWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running -----------------------------------------------------------------------------
    def run(self, fn: Callable, *args, timeout: float | None = None, **kwargs) -> list:
        """Call ``fn(*args, **kwargs)`` on every rank; return the results indexed by rank.

        ``fn`` must be a module-level function (pickled by reference). Raises
        ``DistributedTestError`` if any rank raised, died or the call took over ``timeout`` s.
        """
        name = getattr(fn, "__name__", repr(fn))
        if not self._procs:
            self._start()
            self._collect(_READY, "process group initialization", STARTUP_TIMEOUT_S)
        task_id = self._next_task
        self._next_task += 1
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        return self._collect(task_id, name, self.timeout if timeout is None else timeout)

    def _collect(self, task_id: int, name: str, limit: float) -> list:
        """Wait for every rank's answer to ``task_id``; on any failure kill all and raise."""
        outputs: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + limit
        problem = None
        while len(outputs) + len(failures) < self.world_size:
            try:
                rank, tid, ok, payload = self._results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs)
                        if not p.is_alive() and r not in outputs and r not in failures]
                if dead:
                    codes = {r: self._procs[r].exitcode for r in dead}
                    problem = f"rank(s) {dead} exited without answering (exit codes {codes})"
                elif time.monotonic() > deadline:
                    waiting = [r for r in range(self.world_size)
                               if r not in outputs and r not in failures]
                    problem = (f"rank(s) {waiting} still busy {self.failure_grace_s:g} s after "
                               f"rank(s) {sorted(failures)} failed; killed" if failures else
                               f"timed out waiting for rank(s) {waiting} "
                               f"(limit {limit:.0f} s; a deadlock in a collective?)")
                if problem is None and failures:
                    # Once a rank failed its peers may wait forever in a collective; give them
                    # a short while to fail on their own, then kill.
                    deadline = min(deadline, time.monotonic() + self.failure_grace_s)
                if problem:
                    break
                continue
            if tid != task_id:  # a late initialization failure or a stale answer
                if not ok:
                    failures[rank] = payload
                continue
            if ok:
                outputs[rank] = _loads(payload) if payload else None
            else:
                failures[rank] = payload

        if failures or problem:
            self.close(kill=True)
            parts = [f"{name} failed in a {self.world_size}-process group"]
            if problem:
                parts.append(problem)
            parts += [f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())]
            raise DistributedTestError("\n".join(parts))
        return [outputs[r] for r in range(self.world_size)]


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300.0,
                    init_process_group: bool = True, env: dict[str, str] | None = None,
                    **kwargs) -> list:
    """Start ``world_size`` processes, run ``fn(*args, **kwargs)`` on each, stop them.

    Returns the per-rank results (index = global rank). See the module docstring.
    """
    with DistributedWorkers(world_size, timeout=timeout, init_process_group=init_process_group,
                            env=env) as workers:
        return workers.run(fn, *args, **kwargs)
