"""Collective save and same-layout resume of a training run's full state.

Who writes what (see :mod:`megalite.checkpoint.io` for the directory layout):

* data-parallel rank 0 of every (tp_rank, pp_rank): ``model_tpXX_ppYY.safetensors`` with the
  parameters of all of this rank's model chunks, keyed by their GPTModel names (global layer
  ids), plus per-tensor sharding metadata in the safetensors header; with expert parallelism
  the data-parallel ranks 1..ep-1 (expert ranks 1..ep-1 of the first expert-data-parallel
  replica) write their experts (global ids in the names) to ``model_tpXX_ppYY_epZZ.safetensors``;
* every rank: ``rank_NNNNN.pt`` (``torch.save`` of plain containers only) with its optimizer
  state (``optimizer.state_dict()``: replicated for megalite's optimizer, partitioned for ZeRO),
  its RNG states and the parameter names/layer ranges its optimizer state refers to;
* rank 0: ``config.json`` (``TrainConfig.to_dict()``), ``meta.json`` (iteration, layout, model
  config, tensor index, the caller's ``extra``: consumed samples, ...) and last ``manifest.json``.

The protocol (collective over the world; every rank calls :func:`save_checkpoint`):

1. rank 0 removes leftovers of crashed saves, creates ``iter_N.tmp-<nonce>`` and broadcasts the
   nonce; 2. every rank writes and fsyncs its files and reports their sizes and sha256 (an
   all-gather: a failure on any rank is known to all, nothing becomes visible, no rank hangs);
3. rank 0 writes meta/config/manifest, fsyncs, renames the directory to ``iter_N``, atomically
   replaces ``latest``, prunes old checkpoints (``keep_last``) and broadcasts the outcome.

A kill at any moment leaves either the old ``latest`` with its complete checkpoint, or the new one.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import time
from functools import partial
from typing import Any, Iterable

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megalite.checkpoint import io
from megalite.checkpoint.reshard import (file_metadata, gathered, load_model_weights_from,
                                         model_file_name)
from megalite.checkpoint.reshard_optim import (accepts_resharded, is_zero_optimizer,
                                               reshard_optimizer_state)
from megalite.checkpoint.rng import capture_rng_states, restore_rng_states
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.parallel.sharding import full_shape, sharding_of

__all__ = ["save_checkpoint", "load_checkpoint", "rank_file_name"]

FORMAT = "megalite-checkpoint-1"


def rank_file_name(rank: int) -> str:
    """Optimizer/RNG file of a global rank: ``rank_00003.pt``."""
    return f"rank_{rank:05d}.pt"


# -- collectives that never leave a rank waiting --------------------------------------------------
def _broadcast(obj: Any, ps: ParallelState) -> Any:
    if not ps.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any, ps: ParallelState) -> list:
    if not ps.distributed:
        return [obj]
    out: list = [None] * ps.world_size
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None, ps: ParallelState, what: str) -> None:
    """Raise the same MegaliteError on every rank when any rank reports an error."""
    errors = [e for e in _all_gather(error, ps) if e]
    if errors:
        unique = list(dict.fromkeys(errors))
        raise MegaliteError(f"{what}: " + " | ".join(unique[:4])
                            + (f" | ... ({len(unique) - 4} more)" if len(unique) > 4 else ""))


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, MegaliteError) else f"{type(e).__name__}: {e}"


# -- what this rank holds -------------------------------------------------------------------------
def _named_params(model_chunks: list) -> dict[str, torch.nn.Parameter]:
    params: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if name in params:
                raise MegaliteError(f"parameter {name} appears in two model chunks of one rank")
            params[name] = p
    return params


def _tensor_entry(p: torch.Tensor, ps: ParallelState, pp_rank: int) -> dict:
    dim, stride = sharding_of(p)
    return {"pp_rank": pp_rank, "tensor_parallel_dim": dim, "partition_stride": stride,
            "full_shape": list(full_shape(p, ps.tp_size)),
            "dtype": str(p.dtype).removeprefix("torch.")}


def _layer_ranges(model_chunks: list) -> list[list[int]]:
    return [list(getattr(c, "layer_range", (0, 0))) for c in model_chunks]


def _write_rank_files(tmp: str, model_chunks: list, optimizer: Any, ps: ParallelState,
                      rng_tracker, save_rng: bool = True) -> dict:
    files: dict[str, tuple[int, str]] = {}
    params = _named_params(model_chunks)
    # ZeRO-3 partitions parameters over the DP group: gather them (collective) one at a time,
    # so the device never holds more than one full parameter beyond its partitions.
    tensors, host = {}, {}
    # one copy of the weights per (tp, pp) shard: data- and context-parallel ranks hold the
    # same; with expert parallelism, expert rank e of the first expert-dp replica (dp rank e)
    # writes its experts and dp rank 0 also writes the dense weights
    ep_rank = ps.ep_rank
    writer = ps.cp_rank == 0 and ps.dp_rank < ps.ep_size
    for n, p in params.items():
        expert = getattr(p, "is_expert", False)
        with gathered([p]):   # collective under ZeRO-3: every rank enters it for every p
            if not writer or (ps.dp_rank and not expert):
                continue
            tensors[n] = _tensor_entry(p, ps, ps.pp_rank)
            if expert and ep_rank:
                tensors[n]["ep_rank"] = ep_rank
            # a ZeRO-3 parameter's full data is released when the context ends
            host[n] = p.detach().to("cpu", copy=hasattr(p, "ds_id")).contiguous()
    if writer:
        name = model_file_name(ps.tp_rank, ps.pp_rank, ps.dp_rank)
        path = os.path.join(tmp, name)
        save_file(host, path, metadata=file_metadata(ps.tp_rank, ps.pp_rank, ps, tensors))
        files[name] = io.finish_file(path)
    state = {
        "format": FORMAT, "rank": ps.rank,
        "coordinates": {"tp": ps.tp_rank, "pp": ps.pp_rank, "dp": ps.dp_rank,
                        "cp": ps.cp_rank},
        "param_names": list(params), "layer_ranges": _layer_ranges(model_chunks),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": capture_rng_states(rng_tracker) if save_rng else None,
    }
    io.check_plain(state, f"checkpoint state of rank {ps.rank}")
    name = rank_file_name(ps.rank)
    path = os.path.join(tmp, name)
    torch.save(state, path)
    files[name] = io.finish_file(path)
    return {"files": files, "tensors": tensors if writer else {}}


def _config_dict(config: Any) -> tuple[dict, str]:
    if hasattr(config, "to_dict"):
        return config.to_dict(), "TrainConfig"
    if isinstance(config, dict):
        return dict(config), "dict"
    raise MegaliteError(f"save_checkpoint: config must be a TrainConfig or a dict, got "
                        f"{type(config).__name__}")


# -- save -----------------------------------------------------------------------------------------
def save_checkpoint(directory: str, iteration: int, *, model_chunks: Iterable, optimizer: Any,
                    config: Any, ps: ParallelState, extra: dict | None = None,
                    keep_last: int | None = None, rng_tracker=None, save_rng: bool = True) -> str:
    """Save the full training state as ``directory/iter_{iteration:07d}``; returns its path.

    Collective: every rank of the world calls it with its own chunks and optimizer (``None`` to
    save the model only). ``config``: the run's ``TrainConfig`` (or a plain dict); ``extra``:
    global, JSON-serializable state of the loop (consumed samples, ...), identical on all ranks
    (rank 0's copy is stored). ``keep_last``: afterwards delete all but the newest N complete
    checkpoints. ``rng_tracker``: the tensor-parallel RNG tracker (default: the first chunk's
    ``rng_tracker``). ``save_rng=False`` (``--no-save-rng``) leaves the random states out.
    Raises MegaliteError on every rank if any rank fails; the previous checkpoint and
    ``latest`` are then untouched.
    """
    chunks = list(model_chunks)
    if not chunks:
        raise MegaliteError("save_checkpoint: no model chunks given")
    if rng_tracker is None:
        rng_tracker = getattr(chunks[0], "rng_tracker", None)
    name = io.checkpoint_name(iteration)
    config_dict, config_type = _config_dict(config)

    # 1. rank 0 prepares the temporary directory.
    prep: tuple = ("", "")
    if ps.rank == 0:
        try:
            os.makedirs(directory, exist_ok=True)
            io.clean_stale(directory)
            nonce = secrets.token_hex(6)
            os.mkdir(os.path.join(directory, f"{name}.tmp-{nonce}"))
            prep = (nonce, "")
        except OSError as e:
            prep = ("", f"cannot create a checkpoint directory in {directory}: {e}")
    nonce, error = _broadcast(prep, ps)
    if error:
        raise MegaliteError(f"checkpoint save failed: {error}")
    tmp = os.path.join(directory, f"{name}.tmp-{nonce}")

    # 2. every rank writes its files.
    report, error = None, None
    try:
        report = _write_rank_files(tmp, chunks, optimizer, ps, rng_tracker, save_rng)
    except Exception as e:   # reported to all ranks below, so that none waits forever
        error = f"rank {ps.rank}: {_describe(e)}"
    reports = _all_gather(report if error is None else error, ps)
    failed = [r for r in reports if isinstance(r, str)]
    if failed:
        if ps.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise MegaliteError(f"checkpoint save of iteration {iteration} failed, the previous "
                            f"checkpoint is untouched: " + " | ".join(failed[:4]))

    # 3. rank 0 commits.
    outcome = ""
    if ps.rank == 0:
        try:
            _commit(directory, name, tmp, nonce, iteration, reports, chunks, ps, config_dict,
                    config_type, extra or {}, keep_last)
        except Exception as e:
            outcome = _describe(e)
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    outcome = _broadcast(outcome, ps)
    if outcome:
        raise MegaliteError(f"checkpoint save of iteration {iteration} failed: {outcome}")
    return os.path.join(directory, name)


def _commit(directory: str, name: str, tmp: str, nonce: str, iteration: int, reports: list,
            chunks: list, ps: ParallelState, config_dict: dict, config_type: str, extra: dict,
            keep_last: int | None) -> None:
    files: dict[str, tuple[int, str]] = {}
    tensors: dict[str, dict] = {}
    for r in reports:
        files.update(r["files"])
        for n, entry in r["tensors"].items():
            tensors.setdefault(n, entry)   # tp ranks agree on everything but the shard
    model_config = chunks[0].config
    meta = {
        "format": FORMAT, "iteration": iteration, "saved_at_unix": time.time(),
        "layout": _layout(ps, chunks),
        "model_config": dataclasses.asdict(model_config), "config_type": config_type,
        "tensors": tensors, "extra": extra, "torch_version": torch.__version__,
    }
    for fname, obj in ((io.META, meta), (io.CONFIG, config_dict)):
        try:
            io.write_json_atomic(os.path.join(tmp, fname), obj)
        except (TypeError, ValueError) as e:
            raise MegaliteError(f"{fname} is not JSON-serializable ({e}); keep `extra` and the "
                                f"config to numbers, strings, lists and dicts") from None
        files[fname] = io.finish_file(os.path.join(tmp, fname))
    io.write_manifest(tmp, files)   # last: a tmp dir with a manifest is complete
    io.fsync_dir(tmp)
    final = os.path.join(directory, name)
    aside = None
    if os.path.exists(final):   # saving the same iteration again: move the old one aside
        aside = os.path.join(directory, f"{name}.del-{nonce}")
        os.rename(final, aside)
    os.rename(tmp, final)
    io.fsync_dir(directory)
    io.write_latest(directory, name)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if keep_last is not None:
        io.prune_checkpoints(directory, keep_last, nonce)


# -- load -----------------------------------------------------------------------------------------
def load_checkpoint(directory: str, *, model_chunks: Iterable, optimizer: Any, ps: ParallelState,
                    config: Any = None, iteration: int | None = None,
                    load_optimizer: bool = True, restore_rng: bool = True,
                    verify_checksums: bool = True, rng_tracker=None) -> dict | None:
    """Restore a run from ``directory`` (its ``latest``, or ``iteration``); None if it holds no
    checkpoint. Collective: all ranks call it; a failure on any rank raises on all.

    Model weights load under any layout (:mod:`megalite.checkpoint.reshard`). Under the saved
    layout (TP, PP, DP, virtual stages, layer split) this rank's optimizer and RNG states are
    restored exactly. Under another layout (or another ZeRO stage, or ZeRO switched on or off)
    the optimizer state, megalite's or ZeRO's, is resharded by parameter name
    (:mod:`megalite.checkpoint.reshard_optim`); under another layout the RNG states are left
    alone (per-rank streams have no counterpart). ``load_optimizer=False`` loads the weights
    only.
    Verification: every manifest file's size always; the sha256 of every file this rank reads
    unless ``verify_checksums=False``. ``config`` is accepted for symmetry and not used.

    Returns the saved ``extra`` plus ``iteration``, ``checkpoint_dir``, ``layout_changed``,
    ``weights_only`` (a checkpoint without rank files, e.g. from ``megalite convert from-hf``:
    only the weights were loaded, the caller must start its optimizer from them),
    ``optimizer_resharded``, ``rng_restored`` and ``rng_states`` (this rank's saved states, or
    None).
    """
    del config
    chunks = list(model_chunks)
    if rng_tracker is None and chunks:
        rng_tracker = getattr(chunks[0], "rng_tracker", None)
    result, error = None, None
    try:
        result = _load_local(directory, chunks, optimizer, ps, iteration, load_optimizer,
                             restore_rng, verify_checksums, rng_tracker)
    except Exception as e:
        error = f"rank {ps.rank}: {_describe(e)}"
        if isinstance(e, MegaliteError) and any(
                w in str(e) for w in ("damaged", "corrupt", "missing", "refusing")):
            error += _older_hint(directory)
    found = _all_gather(result is not None, ps)
    _agree(error, ps, f"cannot load the checkpoint from {directory}")
    if any(found) and not all(found):
        raise MegaliteError(f"some ranks found a checkpoint in {directory} and others did not; "
                            f"is {directory} on a file system every rank sees?")
    apply_optimizer = result.pop("_apply_optimizer", None) if result is not None else None
    if apply_optimizer is not None:
        apply_optimizer()
    return result


def _load_local(directory: str, chunks: list, optimizer: Any, ps: ParallelState,
                iteration: int | None, load_optimizer: bool, restore_rng: bool,
                verify_checksums: bool, rng_tracker) -> dict | None:
    path = io.resolve_checkpoint(directory, iteration)
    if path is None:
        return None
    files = io.verify_manifest(path)
    meta = io.read_json(os.path.join(path, io.META))
    if meta.get("format") != FORMAT:
        raise MegaliteError(f"{os.path.join(path, io.META)}: unknown format "
                            f"{meta.get('format')!r} (expected {FORMAT})")
    saved = meta["layout"]
    layout = _layout(ps, chunks)
    changed = any(saved.get(k, 1 if k == "ep_size" else None) != v
                  for k, v in layout.items()) or saved.get("cp_size", 1) != ps.cp_size
    # A weights-only checkpoint (``megalite convert from-hf``) has no rank files: the run starts
    # a fresh optimizer and keeps its own RNG seeding.
    weights_only = bool((meta.get("extra") or {}).get("weights_only"))
    if weights_only:
        load_optimizer = restore_rng = False
    want_optimizer = load_optimizer and optimizer is not None
    # Under another layout the optimizer state follows by parameter name (megalite's or ZeRO).
    movable = want_optimizer and accepts_resharded(optimizer)
    if changed and want_optimizer and not movable:
        _refuse(path, saved, layout)
    load_model_weights_from(path, meta, files, chunks, ps, verify_checksums=verify_checksums)

    state = None
    if not changed and (want_optimizer or restore_rng):
        name = rank_file_name(ps.rank)
        if verify_checksums:
            io.verify_checksum(path, name, files)
        state = io.safe_torch_load(os.path.join(path, name))
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise MegaliteError(f"{os.path.join(path, name)} is not a megalite rank file")
        params = list(_named_params(chunks))
        if state["param_names"] != params or state["layer_ranges"] != _layer_ranges(chunks):
            changed, state = True, None   # same sizes, another layer split: state misaligned
            if want_optimizer and not movable:
                _refuse(path, saved, layout)
    # Same layout, another kind of optimizer state (ZeRO stage changed, ZeRO on or off): the
    # RNG streams still fit, the optimizer state goes by name.
    other_kind = bool(state is not None and want_optimizer and movable and
                      _zero_stage(state["optimizer"]) != optimizer.zero_stage)
    # Loading into ZeRO is collective over dp (weights all-gathered from the new masters): it
    # runs after every rank has read and checked its part (`_apply_optimizer`), so a bad file
    # on one rank fails all of them instead of leaving the others waiting in a collective.
    apply_optimizer = None
    if (changed or other_kind) and want_optimizer:
        apply_optimizer = reshard_optimizer_state(
            path, meta, files, chunks, optimizer, ps, rank_file=rank_file_name,
            verify_checksums=verify_checksums, defer=True)
    if state is not None:
        if want_optimizer and not other_kind:
            saved_opt = state["optimizer"]
            if saved_opt is None:
                raise MegaliteError(f"{os.path.join(path, rank_file_name(ps.rank))} holds no "
                                    f"optimizer state (saved without an optimizer)")

            if is_zero_optimizer(optimizer):   # collective: check here, load after agreement
                optimizer.check_state_dict(saved_opt)
                apply_optimizer = partial(optimizer.load_state_dict, saved_opt)
            else:
                try:
                    optimizer.load_state_dict(saved_opt)
                except (KeyError, ValueError, RuntimeError, TypeError) as e:
                    raise MegaliteError(f"optimizer state in {path} does not fit this "
                                        f"optimizer: {type(e).__name__}: {e}") from None
        if restore_rng and state["rng"] is not None:   # None: written by offline resharding
            restore_rng_states(state["rng"], rng_tracker)
    out = dict(meta.get("extra") or {})
    out.update(iteration=int(meta["iteration"]), checkpoint_dir=path, layout_changed=changed,
               weights_only=weights_only,
               rng_restored=bool(restore_rng and state is not None and state["rng"] is not None),
               optimizer_resharded=bool((changed or other_kind) and want_optimizer),
               rng_states=state["rng"] if state is not None else None,
               _apply_optimizer=apply_optimizer)
    return out


def checkpoint_extra(directory: str, iteration: int | None = None) -> dict | None:
    """The ``extra`` state saved with the checkpoint ``load_checkpoint`` would read (``latest``
    or ``iteration``), or None when ``directory`` holds none; not collective, reads one file.
    A trainer uses it to see a weights-only checkpoint before building its optimizer."""
    path = io.resolve_checkpoint(directory, iteration)
    if path is None:
        return None
    return dict(io.read_json(os.path.join(path, io.META)).get("extra") or {})


def _zero_stage(saved_optimizer: Any) -> int:
    """The ZeRO stage a rank file's optimizer state was saved with (0: not ZeRO), as an
    optimizer declares it (``TrainingOptimizer.zero_stage``)."""
    if isinstance(saved_optimizer, dict) and "zero_stage" in saved_optimizer:
        return int(saved_optimizer["zero_stage"])
    return 0


def _older_hint(directory: str) -> str:
    """For a damaged newest checkpoint: name the older complete ones one could resume from."""
    try:
        current = io.read_latest(directory)
        others = [n for _, n in io.list_checkpoints(directory) if n != current]
    except (MegaliteError, OSError):
        return ""
    if not others:
        return ""
    return (f" (older checkpoints in {directory}: {', '.join(others[-3:])}; to resume from one, "
            f"write its name into {os.path.join(directory, io.LATEST)})")


def _refuse(path: str, saved: dict, layout: dict) -> None:
    raise MegaliteError(
        f"checkpoint {path} was saved with layout {_fmt(saved)} (or another pipeline layer "
        f"split); this run is {_fmt(layout)}: this run's optimizer (neither megalite's nor "
        f"ZeRO) cannot take state from another layout; load the model weights only "
        f"(load_optimizer=False)")


def _layout(ps: ParallelState, chunks: list) -> dict:
    """The layout a checkpoint records (``cp_size`` only with context parallelism, so the
    metadata of other layouts is what it was before CP existed; ``ep_size`` always, 1 read for
    checkpoints from before expert parallelism)."""
    layout = {"tp_size": ps.tp_size, "pp_size": ps.pp_size, "dp_size": ps.dp_size,
              "vp_size": len(chunks), "world_size": ps.world_size, "ep_size": ps.ep_size}
    if ps.cp_size > 1:
        layout["cp_size"] = ps.cp_size
    return layout


def _fmt(layout: dict) -> str:
    # CP and EP only where used, so messages about other layouts read as before
    cp = f" CP={layout['cp_size']}" if layout.get("cp_size", 1) > 1 else ""
    ep = f" EP={layout['ep_size']}" if layout.get("ep_size", 1) > 1 else ""
    return (f"TP={layout.get('tp_size')}{cp} PP={layout.get('pp_size')} "
            f"DP={layout.get('dp_size')}{ep} VP={layout.get('vp_size')}")
