"""Offline resharding: rewrite a checkpoint for another (TP, PP, virtual-stage) layout.

``reshard_checkpoint(A, B, target_tp, target_pp)`` builds, one target rank at a time, that rank's
model chunks (``ParallelState.for_shapes``: no process group), fills them with
:func:`~megalite.checkpoint.reshard.load_model_weights_from`, rebuilds megalite's optimizer over
them and reshards its state by parameter name
(:func:`~megalite.checkpoint.reshard_optim.reshard_optimizer_state`), and writes the same files
an online save of that layout would (data-parallel size 1; a run with more DP ranks loads it as
any other layout change). Then the manifest, the rename into place and ``latest``, exactly as
:func:`~megalite.checkpoint.sharded.save_checkpoint` commits.

Memory: one target rank's model shard and optimizer state at a time, plus one full tensor while
unsharding. RNG states are not carried over (no per-rank stream has a counterpart in another
layout): the rank files hold none, and a resumed run keeps its freshly seeded generators.
Checkpoints whose optimizer state cannot be resharded (ZeRO partitions, no TrainConfig) are
rewritten with the model weights only.
"""
from __future__ import annotations

import copy
import os
import secrets
import shutil

import torch
from safetensors.torch import save_file

from megalite.checkpoint import io
from megalite.checkpoint.reshard import (_model_config, file_metadata, load_model_weights_from,
                                         model_file_name, read_train_config)
from megalite.checkpoint.reshard_optim import reshard_optimizer_state
from megalite.checkpoint.sharded import FORMAT, _commit, _tensor_entry, rank_file_name
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError

__all__ = ["reshard_checkpoint"]


def _target_config(config, tp: int, pp: int, vp_layers: int | None, split):
    """The saved config with the parallel sizes of the new layout (dict or TrainConfig)."""
    if hasattr(config, "to_dict"):
        d = copy.deepcopy(config.to_dict())
        kind = "TrainConfig"
    else:
        d, kind = copy.deepcopy(config), "dict"
    par = d.get("parallel") if isinstance(d, dict) else None
    if isinstance(par, dict):
        par.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                   num_layers_per_virtual_pipeline_stage=vp_layers, pipeline_layer_split=split)
    return d, kind


def reshard_checkpoint(load_dir: str, save_dir: str, *, target_tp: int, target_pp: int,
                       num_layers_per_virtual_stage: int | None = None,
                       pipeline_layer_split: list[int] | None = None,
                       iteration: int | None = None, verify_checksums: bool = True) -> str:
    """Write the checkpoint of ``load_dir`` (``latest`` or ``iteration``) for layout
    ``target_tp`` x ``target_pp`` (optional virtual stages / uneven split) as
    ``save_dir/iter_N``; returns its path. Single process, no torch.distributed."""
    from megalite.parallel.pipeline.stages import build_model_chunks   # noqa: PLC0415

    src = io.resolve_checkpoint(load_dir, iteration)
    if src is None:
        raise MegaliteError(f"no checkpoint found in {load_dir}")
    files = io.verify_manifest(src)
    meta = io.read_json(os.path.join(src, io.META))
    if meta.get("format") != FORMAT:
        raise MegaliteError(f"{os.path.join(src, io.META)}: unknown format {meta.get('format')!r}")
    model_config = _model_config(meta, src)
    config = read_train_config(src)
    has_train_config = hasattr(config, "optim") and hasattr(config, "precision")
    vp = 1
    if num_layers_per_virtual_stage is not None:
        if model_config.num_layers % (target_pp * num_layers_per_virtual_stage):
            raise MegaliteError(f"num_layers={model_config.num_layers} is not divisible by "
                                f"pipeline size {target_pp} x {num_layers_per_virtual_stage} "
                                f"layers per virtual stage")
        vp = model_config.num_layers // (target_pp * num_layers_per_virtual_stage)
    iteration_n = int(meta["iteration"])
    name = io.checkpoint_name(iteration_n)
    os.makedirs(save_dir, exist_ok=True)
    io.clean_stale(save_dir)
    nonce = secrets.token_hex(6)
    tmp = os.path.join(save_dir, f"{name}.tmp-{nonce}")
    os.mkdir(tmp)
    try:
        reports, chunks, ps = [], None, None
        for pp_rank in range(target_pp):
            for tp_rank in range(target_tp):
                ps = ParallelState.for_shapes(target_tp, tp_rank, target_pp, pp_rank)
                chunks = build_model_chunks(model_config, ps, vp_size=vp,
                                            split=pipeline_layer_split, device="cpu")
                load_model_weights_from(src, meta, files, chunks, ps,
                                        verify_checksums=verify_checksums)
                optimizer = None
                if has_train_config:
                    optimizer = _rebuild_optimizer(src, meta, files, chunks, config, ps,
                                                   verify_checksums)
                reports.append(_write_rank(tmp, chunks, optimizer, ps))
        config_dict, config_type = _target_config(config, target_tp, target_pp,
                                                  num_layers_per_virtual_stage,
                                                  pipeline_layer_split)
        _commit(save_dir, name, tmp, nonce, iteration_n, reports, chunks, ps, config_dict,
                config_type, meta.get("extra") or {}, None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(save_dir, name)


def _rebuild_optimizer(src, meta, files, chunks, config, ps, verify_checksums):
    """megalite's optimizer over ``chunks`` holding the checkpoint's state, or None when that
    state is not reshardable (ZeRO)."""
    from megalite.optim.optimizer import Optimizer   # noqa: PLC0415
    if config.parallel.zero_stage or config.parallel.deepspeed_config:
        return None
    optimizer = Optimizer(chunks, config.optim, config.precision, ps)
    reshard_optimizer_state(src, meta, files, chunks, optimizer, ps, rank_file=rank_file_name,
                            verify_checksums=verify_checksums)
    return optimizer


def _write_rank(tmp: str, chunks: list, optimizer, ps: ParallelState) -> dict:
    """The model file and rank file of target rank (tp_rank, pp_rank, dp 0); its report."""
    params = {n: p for c in chunks for n, p in c.named_parameters()}
    tensors = {n: _tensor_entry(p, ps, ps.pp_rank) for n, p in params.items()}
    files = {}
    mname = model_file_name(ps.tp_rank, ps.pp_rank)
    save_file({n: p.detach().contiguous() for n, p in params.items()}, os.path.join(tmp, mname),
              metadata=file_metadata(ps.tp_rank, ps.pp_rank, ps, tensors))
    files[mname] = io.finish_file(os.path.join(tmp, mname))
    state = {"format": FORMAT, "rank": ps.rank,
             "coordinates": {"tp": ps.tp_rank, "pp": ps.pp_rank, "dp": 0},
             "param_names": list(params),
             "layer_ranges": [list(c.layer_range) for c in chunks],
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "rng": None}
    io.check_plain(state, f"resharded state of rank {ps.rank}")
    rname = rank_file_name(ps.rank)
    torch.save(state, os.path.join(tmp, rname))
    files[rname] = io.finish_file(os.path.join(tmp, rname))
    return {"files": files, "tensors": tensors}
