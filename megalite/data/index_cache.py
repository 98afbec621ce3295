"""On-disk cache of dataset index arrays, built once and memory-mapped by every process.

An entry is named by the sha256 of a JSON *description* of everything that determines the
arrays (dataset path, .idx size and mtime, split, sample count, sequence length, seed, algorithm
version). In ``cache_dir`` it consists of::

    <digest>-<name>.npy   one file per array (np.save format, loaded with mmap_mode="r")
    <digest>.json         the description plus the file list; written last, so its presence
                          means the entry is complete
    <digest>.lock         fcntl lock file serialising builders of this entry

Every file is written to a temporary name and renamed into place.

Who builds:

* ``torch.distributed`` initialised: global rank 0 builds (under the file lock, which also
  protects against other jobs sharing the cache dir), then broadcasts success or its error to
  all ranks, which then load. If the cache dir is node-local (not shared between nodes), a rank
  that still finds no entry builds it under the lock, so each node builds at most once.
* otherwise: the first process to take the lock builds; concurrent ones wait and then load.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from typing import Callable

import numpy as np

from megalite.errors import MegaliteError

# Bump when the meaning of any cached array changes, so old entries are never reused. v1 was
# megalite's own splitmix64 shuffles and document split; v2 is megatron-core 0.16.1's indices.
ALGORITHM_VERSION = "megalite-index-v2-megatron"


def description_digest(description: dict) -> str:
    """sha256 hex digest of the description as canonical JSON (sorted keys)."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def default_cache_dir(prefix: str, cache_dir: str | None = None) -> str:
    """Where the caches of data prefix ``prefix`` live: ``cache_dir`` (``--data-cache-path``)
    or ``<the prefix's directory>/index-cache``."""
    return cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def file_identity(path: str) -> dict:
    """What identifies a data file for the cache: absolute path, size and mtime (ns)."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class IndexCacheEntry:
    """One cache entry: ``names`` arrays described by ``description`` under ``cache_dir``."""

    def __init__(self, cache_dir: str, description: dict, names: list[str],
                 algorithm: str = ALGORITHM_VERSION):
        self.cache_dir = os.path.abspath(cache_dir)
        self.description = dict(description, algorithm=algorithm)
        self.digest = description_digest(self.description)
        self.names = list(names)
        self.paths = {n: os.path.join(self.cache_dir, f"{self.digest}-{n}.npy") for n in names}
        self.json_path = os.path.join(self.cache_dir, f"{self.digest}.json")
        self.lock_path = os.path.join(self.cache_dir, f"{self.digest}.lock")

    def complete(self) -> bool:
        return os.path.exists(self.json_path)

    def load(self) -> dict[str, np.ndarray]:
        """Memory-map every array (read-only)."""
        arrays = {}
        for name, path in self.paths.items():
            try:
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise MegaliteError(
                    f"index cache entry {self.json_path} is damaged ({path}: {e}); "
                    f"delete the files {self.digest}* in {self.cache_dir} to rebuild it") from e
        return arrays

    def _write(self, arrays: dict[str, np.ndarray], build_seconds: float) -> None:
        tag = f".tmp.{os.getpid()}"
        for name in self.names:
            tmp = self.paths[name] + tag
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.paths[name])
        meta = {"description": self.description,
                "files": {n: os.path.basename(p) for n, p in self.paths.items()},
                "shapes": {n: list(arrays[n].shape) for n in self.names},
                "build_seconds": round(build_seconds, 4),
                "built_by": {"host": os.uname().nodename, "pid": os.getpid(),
                             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        tmp = self.json_path + tag
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.json_path)

    def load_or_build_locked(self, build: Callable[[], dict[str, np.ndarray]]
                             ) -> tuple[dict[str, np.ndarray], bool]:
        """Load the entry, building it first under the file lock if missing.

        Returns ``(arrays, built)``; ``built`` tells whether this call ran ``build``."""
        if self.complete():
            return self.load(), False
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            lock = open(self.lock_path, "a+")
        except OSError as e:
            raise MegaliteError(f"cannot create the index cache in {self.cache_dir} ({e}); "
                                "choose a writable cache directory") from e
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            if self.complete():  # another process built it while we waited
                return self.load(), False
            t0 = time.perf_counter()
            arrays = build()
            self._write(arrays, time.perf_counter() - t0)
            del arrays  # hand back memory maps, like every other process gets
        return self.load(), True


def load_or_build(cache_dir: str, description: dict, names: list[str],
                  build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
    """Get the arrays of the entry ``description`` from ``cache_dir``, building them once.

    ``build()`` returns ``{name: array}`` for every name in ``names``. Returns
    ``(arrays, built)``: read-only memory maps, and whether this process ran ``build``. See the
    module docstring for which process builds when ``torch.distributed`` is initialised; there
    every rank of the default group must call this with the same description.
    """
    entry = IndexCacheEntry(cache_dir, description, names)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return entry.load_or_build_locked(build)

    arrays, built, failure = None, False, None
    if dist.get_rank() == 0:
        try:
            arrays, built = entry.load_or_build_locked(build)
        except Exception as e:  # tell the other ranks instead of leaving them in a collective
            failure = f"{type(e).__name__}: {e}"
            status = [failure]
            dist.broadcast_object_list(status, src=0)
            raise
    status = [failure]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise MegaliteError(f"rank 0 failed to build the index cache entry {entry.json_path}: "
                            f"{status[0]}")
    if arrays is None:
        # Shared cache dir: rank 0's entry is there. Node-local dir: built once per node here.
        arrays, built = entry.load_or_build_locked(build)
    return arrays, built
