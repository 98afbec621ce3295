"""File-level checkpoint machinery: directory names, durable writes, the manifest, safe loading.

Nothing here knows about models or process groups; :mod:`megalite.checkpoint.sharded` decides
what each rank writes, this module makes it durable and verifiable.

On-disk layout under a save directory ``SAVE``::

    SAVE/latest                          "iter_0000100\\n": the newest *complete* checkpoint
    SAVE/iter_0000100/                   one complete checkpoint (only ever created by rename)
        manifest.json                    every other file: size and sha256
        meta.json, config.json           iteration, layout, tensor index / TrainConfig.to_dict()
        model_tp00_pp00.safetensors      model shards, one per (tp_rank, pp_rank)
        rank_00000.pt                    optimizer + RNG state, one per global rank
    SAVE/iter_0000200.tmp-<nonce>/       a save in progress (or one that crashed): ignored
    SAVE/iter_0000050.del-<nonce>/       a checkpoint being pruned: ignored

Atomicity rests on two POSIX guarantees: ``rename`` of a directory or file within one file system
is atomic, and data is on disk after ``fsync`` of the file and of its parent directory. A
checkpoint directory therefore either does not exist under its final name or is complete, and
``latest`` is replaced by writing a temporary file and renaming it over the old one.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from typing import Any

import torch

from megalite.errors import MegaliteError

__all__ = [
    "MANIFEST", "META", "CONFIG", "LATEST", "checkpoint_name", "parse_checkpoint_name",
    "fsync_dir", "finish_file", "write_json_atomic", "write_latest", "read_latest",
    "list_checkpoints", "resolve_checkpoint", "locate_beside_checkpoint", "clean_stale",
    "prune_checkpoints", "write_manifest", "verify_manifest", "verify_checksum", "safe_torch_load", "check_plain",
    "read_json",
]

MANIFEST = "manifest.json"
META = "meta.json"
CONFIG = "config.json"
LATEST = "latest"
_NAME_RE = re.compile(r"^iter_(\d{7,})$")
_STALE_RE = re.compile(r"^iter_\d{7,}\.(tmp|del)-[0-9a-f]+$")
_HASH_BLOCK = 8 << 20


# -- names ----------------------------------------------------------------------------------------
def checkpoint_name(iteration: int) -> str:
    """Directory name of the checkpoint after ``iteration`` steps: ``iter_0000100``."""
    if not isinstance(iteration, int) or iteration < 0:
        raise MegaliteError(f"checkpoint iteration must be a non-negative integer, "
                            f"got {iteration!r}")
    return f"iter_{iteration:07d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The iteration of a complete checkpoint's directory name, or None for any other name."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


# -- durable writes -------------------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_file(path: str) -> tuple[int, str]:
    """fsync a file just written and return ``(size, sha256 hex)``.

    The file is read back in blocks to hash it (from the page cache right after writing), so the
    writer (safetensors, torch.save) needs no hashing support and memory stays bounded.
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            size += len(block)
        os.fsync(f.fileno())
    return size, h.hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary name, fsync, rename, fsync the dir."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_json(path: str) -> Any:
    """Parse a JSON file; MegaliteError naming it when it is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MegaliteError(f"checkpoint file {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MegaliteError(f"checkpoint file {path} is unreadable or corrupt: {e}") from None


# -- the latest pointer ---------------------------------------------------------------------------
def write_latest(directory: str, name: str) -> None:
    """Point ``directory/latest`` at checkpoint ``name`` (atomic replace)."""
    path = os.path.join(directory, LATEST)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def read_latest(directory: str) -> str | None:
    """The checkpoint name in ``directory/latest``; None when there is no such file."""
    path = os.path.join(directory, LATEST)
    try:
        with open(path, encoding="utf-8") as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise MegaliteError(f"cannot read {path}: {e}") from None
    if parse_checkpoint_name(name) is None:
        raise MegaliteError(f"{path} does not name a checkpoint directory (expected something "
                            f"like iter_0000100, found {name[:60]!r})")
    return name


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``directory`` as ``(iteration, name)``, oldest first.

    Complete means: a final name (never a ``.tmp-``/``.del-`` one) holding a manifest.
    """
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in entries:
        it = parse_checkpoint_name(name)
        if it is not None and os.path.isfile(os.path.join(directory, name, MANIFEST)):
            found.append((it, name))
    return sorted(found)


def resolve_checkpoint(directory: str, iteration: int | None = None) -> str | None:
    """Path of the checkpoint to load from save directory ``directory``, or None if it has none.

    ``iteration`` given: that checkpoint (MegaliteError if it is absent). Otherwise the one named
    by ``latest``; without a ``latest`` file, the newest complete checkpoint. ``directory`` may
    also be a checkpoint directory itself (``SAVE/iter_0000100``).
    """
    if parse_checkpoint_name(os.path.basename(os.path.normpath(directory))) is not None \
            and os.path.isfile(os.path.join(directory, MANIFEST)):
        return directory
    if iteration is not None:
        path = os.path.join(directory, checkpoint_name(iteration))
        if not os.path.isdir(path):
            have = [it for it, _ in list_checkpoints(directory)]
            raise MegaliteError(f"no checkpoint for iteration {iteration} in {directory} "
                                f"(complete checkpoints: {have or 'none'})")
        return path
    name = read_latest(directory)
    if name is None:
        found = list_checkpoints(directory)
        return os.path.join(directory, found[-1][1]) if found else None
    path = os.path.join(directory, name)
    if not os.path.isdir(path):
        # A save that replaced this very iteration died between moving the old directory aside
        # and renaming the new one in: the old one is complete under its ".del-" name.
        aside = _set_aside(directory, name)
        if aside is not None:
            return aside
        raise MegaliteError(f"{os.path.join(directory, LATEST)} names {name}, but {path} does "
                            f"not exist (deleted by hand?); pass the iteration to load explicitly")
    return path


def _set_aside(directory: str, name: str) -> str | None:
    """A complete ``name.del-*`` directory (see :func:`resolve_checkpoint`), or None."""
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return None
    for entry in entries:
        if entry.startswith(name + ".del-") and os.path.isfile(
                os.path.join(directory, entry, MANIFEST)):
            return os.path.join(directory, entry)
    return None


# -- cleanup --------------------------------------------------------------------------------------
def clean_stale(directory: str) -> list[str]:
    """Remove leftovers of crashed saves/prunes (``*.tmp-*``, ``*.del-*``); returns their names.

    Only call when no save is in progress (rank 0, at the start of a collective save).
    """
    removed = []
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return removed
    current = read_latest(directory)
    if current is not None and not os.path.isdir(os.path.join(directory, current)):
        aside = _set_aside(directory, current)   # put the checkpoint latest names back first
        if aside is not None:
            os.rename(aside, os.path.join(directory, current))
            fsync_dir(directory)
            entries = os.listdir(directory)
    for name in entries:
        if _STALE_RE.match(name):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            removed.append(name)
    return removed


def prune_checkpoints(directory: str, keep_last: int, nonce: str) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns the removed names.

    Never removes the checkpoint ``latest`` names. Each victim is first renamed to
    ``*.del-<nonce>`` (atomic), so a crash mid-delete leaves no half-deleted directory under a
    final name; call this only after the newer checkpoint and ``latest`` are durable.
    """
    if keep_last < 1:
        raise MegaliteError(f"--keep-last must be >= 1, got {keep_last}")
    current = read_latest(directory)
    found = list_checkpoints(directory)
    victims = [name for _, name in found[:-keep_last] if name != current]
    for name in victims:
        doomed = os.path.join(directory, f"{name}.del-{nonce}")
        os.rename(os.path.join(directory, name), doomed)
    if victims:
        fsync_dir(directory)
    for name in victims:
        shutil.rmtree(os.path.join(directory, f"{name}.del-{nonce}"), ignore_errors=True)
    return victims


# -- manifest -------------------------------------------------------------------------------------
def write_manifest(ckpt_dir: str, files: dict[str, tuple[int, str]]) -> None:
    """Write ``manifest.json``: ``{"files": {name: {"size": n, "sha256": hex}}}``."""
    write_json_atomic(os.path.join(ckpt_dir, MANIFEST), {
        "format": "megalite-checkpoint-1",
        "files": {n: {"size": s, "sha256": h} for n, (s, h) in sorted(files.items())}})


def verify_manifest(ckpt_dir: str) -> dict[str, dict]:
    """Check that every file of the manifest exists with its recorded size; return the entries.

    Sizes only (a ``stat`` per file, cheap): checksums are verified per file by the rank that
    reads it (:func:`verify_checksum`). MegaliteError names every missing or wrong-sized file.
    """
    manifest = read_json(os.path.join(ckpt_dir, MANIFEST))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise MegaliteError(f"{os.path.join(ckpt_dir, MANIFEST)} has no 'files' table")
    problems = []
    for name, entry in sorted(files.items()):
        path = os.path.join(ckpt_dir, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if size != entry["size"]:
            problems.append(f"{path} has {size} bytes, the manifest says {entry['size']} "
                            f"(truncated or overwritten)")
    if problems:
        raise MegaliteError(f"checkpoint {ckpt_dir} is damaged: " + "; ".join(problems))
    return files


def verify_checksum(ckpt_dir: str, name: str, files: dict[str, dict]) -> None:
    """Hash ``ckpt_dir/name`` and compare with its manifest entry (MegaliteError naming it)."""
    path = os.path.join(ckpt_dir, name)
    if name not in files:
        raise MegaliteError(f"{path} is not listed in {os.path.join(ckpt_dir, MANIFEST)}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    if h.hexdigest() != files[name]["sha256"]:
        raise MegaliteError(f"{path} is corrupt: its sha256 does not match "
                            f"{os.path.join(ckpt_dir, MANIFEST)}")


# -- safe loading ---------------------------------------------------------------------------------
# Types torch.load(weights_only=True) reconstructs without running code from the file. Exact
# types: subclasses (an IntEnum such as DeepSpeed's ZeroStageEnum, a defaultdict) pickle as a
# reference to their class, which weights_only refuses.
_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device, torch.Size)
_PLAIN_MAPPINGS = (dict, collections.OrderedDict)


def check_plain(obj: Any, what: str, path: str = "") -> None:
    """Raise MegaliteError when ``obj`` holds anything but tensors, numbers, strings and plain
    containers, i.e. what ``torch.load(weights_only=True)`` could not load back. Saving checks
    this first so an unloadable checkpoint is refused at save time, naming the offending key."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_SCALARS:
        return
    if type(obj) in _PLAIN_MAPPINGS:
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool, type(None)):
                raise MegaliteError(f"{what}: key {k!r} at '{path}' is a {type(k).__name__}; "
                                    f"checkpoints hold plain keys only")
            check_plain(v, what, f"{path}/{k}")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, what, f"{path}[{i}]")
        return
    raise MegaliteError(f"{what}: '{path or '/'}' is a {type(obj).__module__}."
                        f"{type(obj).__qualname__}; checkpoints hold only tensors, numbers, "
                        f"strings and dict/list/tuple (so loading can never run code)")


def safe_torch_load(path: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with clear errors; ``mmap``: map
    the tensors' bytes lazily instead of reading the file (for picking a few tensors).

    A file whose pickle asks for any other object (e.g. a crafted ``__reduce__`` calling
    ``os.system``) is refused before the object is built, so nothing in it runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "Unsupported" in ln or "global" in ln.lower()),
                      first[0] if first else "")
        raise MegaliteError(f"refusing to load {path}: it contains a pickled object other than "
                            f"tensors and plain containers, which could execute code "
                            f"({detail.strip()[:200]})") from None
    except FileNotFoundError:
        raise MegaliteError(f"checkpoint file {path} is missing") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise MegaliteError(f"checkpoint file {path} is corrupt or not a torch.save file: "
                            f"{str(e).strip()[:200]}") from None


def locate_beside_checkpoint(path: str | None, load_dir: str) -> str | None:
    """A file a checkpoint's config names (its tokenizer), saved as a relative path: as saved
    (from the working directory), else next to the checkpoint, its save directory or above."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    base = os.path.abspath(load_dir)
    for root in (base, os.path.dirname(base), os.path.dirname(os.path.dirname(base))):
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    return path   # not found: build_tokenizer names the flag and the path
