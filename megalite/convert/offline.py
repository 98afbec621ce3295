"""megalite checkpoints read and written offline, in one process, for any (TP, PP) layout.

A conversion node does not run the training layout: :class:`CheckpointReader` assembles any
parameter's *full* tensor from a checkpoint saved under any TP/PP/virtual-stage layout (one
tensor at a time, from memory-mapped safetensors shards), and :func:`write_checkpoint` writes a
checkpoint directory for a target ``(tp, pp)`` layout exactly as ``megalite train --save`` under
that layout would lay it out (:mod:`megalite.checkpoint.sharded`: one
``model_tpXX_ppYY.safetensors`` per (tp_rank, pp_rank) with the same per-tensor index, meta.json,
config.json, manifest.json, ``latest``), data-parallel size 1.

Which parameter each target rank holds, its shard shape and its sharding attributes come from
building that rank's model chunks on the ``meta`` device (no memory), so the layout rules live in
one place: the model. Every full tensor is produced once per pipeline stage and its shard is
appended to each tp rank's file (:class:`~megalite.convert.hf_io.StreamingSafetensorsWriter`),
so peak memory is about one full tensor.

Rank files (optimizer + RNG state) are written only when the caller passes them (``reshard``
with optimizer state); a weights-only checkpoint (from Hugging Face) has none and says so in
``meta.json``'s ``extra`` (``"weights_only": true``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

import torch

from megalite.checkpoint import io
from megalite.checkpoint.reshard import file_metadata, model_config_from_meta, model_file_name
from megalite.checkpoint.sharded import FORMAT, rank_file_name
from megalite.convert.hf_io import StreamingSafetensorsWriter, progress
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.weights import VOCAB_TENSORS, fit_vocab_rows
from megalite.parallel.context import ModelContext
from megalite.parallel.pipeline.stages import build_model_chunks
from megalite.parallel.sharding import shard_tensor, unshard_tensors

__all__ = ["CheckpointReader", "write_checkpoint", "stage_params"]


class CheckpointReader:
    """A megalite checkpoint (``latest`` of ``directory``, or ``iteration``), any layout.

    Attributes: ``path`` (the resolved ``iter_*`` directory), ``meta``, ``files`` (manifest
    entries, sizes verified), ``config`` (TransformerConfig), ``index`` (meta.json's tensor index).
    """

    def __init__(self, directory: str, iteration: int | None = None,
                 verify_checksums: bool = True):
        if not os.path.isdir(directory):
            raise MegaliteError(f"--load {directory}: no such directory")
        path = io.resolve_checkpoint(directory, iteration)
        if path is None:
            raise MegaliteError(f"--load {directory}: no megalite checkpoint there (no "
                                f"'{io.LATEST}' file and no complete iter_* directory)")
        self.path = path
        self.files = io.verify_manifest(path)
        self.meta = io.read_json(os.path.join(path, io.META))
        if self.meta.get("format") != FORMAT:
            raise MegaliteError(f"{os.path.join(path, io.META)}: unknown format "
                                f"{self.meta.get('format')!r} (expected {FORMAT})")
        self.config: TransformerConfig = model_config_from_meta(self.meta, path)
        self.index: dict[str, dict] = self.meta.get("tensors") or {}
        self.tp = int(self.meta["layout"]["tp_size"])
        self.verify = verify_checksums
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}

    def _handle(self, file_name: str):
        if file_name not in self._handles:
            from safetensors import safe_open
            full = os.path.join(self.path, file_name)
            if self.verify:
                io.verify_checksum(self.path, file_name, self.files)
            try:
                self._handles[file_name] = self._stack.enter_context(
                    safe_open(full, framework="pt", device="cpu"))
            except Exception as e:
                raise MegaliteError(f"{full} is not a readable safetensors file: {e}") from None
        return self._handles[file_name]

    def meta_tensor(self, name: str) -> torch.Tensor:
        """The full tensor's shape and dtype on the meta device (nothing read)."""
        e = self._entry(name)
        return torch.empty(e["full_shape"], dtype=getattr(torch, e["dtype"]), device="meta")

    def _entry(self, name: str) -> dict:
        entry = self.index.get(name)
        if entry is None:
            raise MegaliteError(f"checkpoint {self.path} has no tensor {name!r}")
        return entry

    def full(self, name: str) -> torch.Tensor:
        """The full (unsharded) tensor ``name``, vocabulary padding included."""
        e = self._entry(name)
        pp, dim = int(e["pp_rank"]), e["tensor_parallel_dim"]
        ranks = range(self.tp) if dim is not None else range(1)
        shards = []
        for r in ranks:
            fname = model_file_name(r, pp, int(e.get("ep_rank", 0)))   # experts: their file
            try:
                shards.append(self._handle(fname).get_tensor(name))
            except MegaliteError:
                raise
            except Exception as ex:
                raise MegaliteError(f"{os.path.join(self.path, fname)} does not hold {name!r} "
                                    f"the checkpoint index promises: {ex}") from None
        return unshard_tensors(shards, dim, int(e["partition_stride"]))

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


def stage_params(config: TransformerConfig, tp: int, pp: int, pp_rank: int, ep: int = 1,
                 ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """Parameters (meta device, with their sharding attributes) that tp rank 0 of pipeline stage
    ``pp_rank`` (expert rank ``ep_rank`` of ``ep``) holds under layout (tp, pp, vp=1); every tp
    rank holds the same names."""
    ps = ParallelState.for_shapes(tp, 0, pp, pp_rank, dp_size=ep, ep_size=ep, ep_rank=ep_rank)
    chunks = build_model_chunks(config, ModelContext(ps, device="meta"))
    return {n: p for c in chunks for n, p in c.named_parameters()}


def write_checkpoint(save: str, config: TransformerConfig, tp: int, pp: int,
                     full_of: Callable[[str], torch.Tensor],
                     dtype_of: Callable[[str], torch.dtype],
                     *, config_dict: dict, config_type: str, extra: dict, iteration: int = 0,
                     rank_state: Callable[..., dict] | None = None,
                     desc: str = "write", ep: int = 1) -> str:
    """Write a complete checkpoint ``save/iter_{iteration}`` for layout (tp, pp, dp=1, vp=1),
    or with expert parallelism ``ep`` > 1 (dp = ep): expert rank e's experts go to
    ``model_tpXX_ppYY_epZZ`` files as ``megalite train --save`` writes them.

    Args:
        save: the save directory (created; the caller points it at a temporary directory and
            renames it into place when everything, verification included, succeeded).
        config: the model.
        full_of: full tensor of a megalite parameter name (global layer ids; the tied output
            layer copy of pp > 1 is asked for as ``embedding.word_embeddings.weight``); any
            vocabulary padding (it is refitted to this layout's).
        dtype_of: the dtype to store each name in.
        config_dict / config_type: config.json's content and meta.json's ``config_type``.
        extra: meta.json's ``extra`` (consumed samples, ...).
        rank_state: ``(rank, tp_rank, pp_rank, ep_rank) -> dict`` contents of ``rank_NNNNN.pt``
            (None: write no rank files: a weights-only checkpoint).
    Returns the checkpoint directory.
    """
    name = io.checkpoint_name(iteration)
    out = os.path.join(save, name)
    os.makedirs(out, exist_ok=False)
    padded_vocab = config.padded_vocab(tp)
    files: dict[str, tuple[int, str]] = {}
    index: dict[str, dict] = {}
    # one file group per (pp stage, expert rank): expert rank 0's holds the dense weights too
    stages = []
    for r in range(pp):
        for e in range(ep):
            params = stage_params(config, tp, pp, r, ep, e)
            if e:
                params = {n: p for n, p in params.items() if getattr(p, "is_expert", False)}
            stages.append((r, e, params))
    bar = progress(sum(len(s) for _, _, s in stages), desc)
    for pp_rank, ep_rank, params in stages:
        entries = {}
        for n, p in params.items():
            dim = getattr(p, "tensor_parallel_dim", None)
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp
            entries[n] = {"pp_rank": pp_rank, "tensor_parallel_dim": dim,
                          "partition_stride": getattr(p, "partition_stride", 1),
                          "full_shape": shape, "dtype": str(dtype_of(n)).removeprefix("torch.")}
            if ep_rank:
                entries[n]["ep_rank"] = ep_rank
        writers = []
        for tp_rank in range(tp):
            ps = ParallelState.for_shapes(tp, tp_rank, pp, pp_rank)
            specs = [(n, dtype_of(n), tuple(p.shape)) for n, p in params.items()]
            path = os.path.join(out, model_file_name(tp_rank, pp_rank, ep_rank))
            writers.append(StreamingSafetensorsWriter(
                path, specs, file_metadata(tp_rank, pp_rank, ps, entries)))
        try:
            for n, p in params.items():
                src = n
                if getattr(p, "shared_embedding", False):
                    src = VOCAB_TENSORS[0]   # the last stage's copy of a tied embedding
                full = full_of(src).to(dtype_of(n))
                if n in VOCAB_TENSORS:
                    full = fit_vocab_rows(full, padded_vocab, config.vocab_size, n)
                e = entries[n]
                if list(full.shape) != e["full_shape"]:
                    raise MegaliteError(f"{n}: full shape {list(full.shape)}, the model needs "
                                        f"{e['full_shape']}")
                for tp_rank, w in enumerate(writers):
                    w.write(n, shard_tensor(full, e["tensor_parallel_dim"],
                                            e["partition_stride"], tp_rank, tp))
                del full
                bar.update(1)
            for tp_rank, w in enumerate(writers):
                w.close()
                fname = model_file_name(tp_rank, pp_rank, ep_rank)
                files[fname] = io.finish_file(os.path.join(out, fname))
        finally:
            for w in writers:
                if not w.f.closed:
                    w.f.close()
        for n, e in entries.items():
            index.setdefault(n, e)
    bar.close()
    if rank_state is not None:
        for pp_rank, ep_rank, _ in stages:
            for tp_rank in range(tp):
                rank = (pp_rank * ep + ep_rank) * tp + tp_rank     # dp = ep, dp_rank = ep_rank
                state = rank_state(rank, tp_rank, pp_rank, ep_rank)
                io.check_plain(state, f"rank file {rank}")
                fname = rank_file_name(rank)
                torch.save(state, os.path.join(out, fname))
                files[fname] = io.finish_file(os.path.join(out, fname))
    meta = {"format": FORMAT, "iteration": iteration, "saved_at_unix": time.time(),
            "layout": {"tp_size": tp, "pp_size": pp, "dp_size": ep, "vp_size": 1,
                       "world_size": tp * pp * ep, "ep_size": ep},
            "model_config": dataclasses.asdict(config), "config_type": config_type,
            "tensors": index, "extra": extra, "torch_version": torch.__version__}
    for fname, obj in ((io.META, meta), (io.CONFIG, config_dict)):
        io.write_json_atomic(os.path.join(out, fname), obj)
        files[fname] = io.finish_file(os.path.join(out, fname))
    io.write_manifest(out, files)
    io.fsync_dir(out)
    io.write_latest(save, name)
    return out
