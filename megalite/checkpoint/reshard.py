"""Model weights from a checkpoint of any (TP, PP, virtual-stage) layout into this rank's chunks.

Expert weights are named by global expert id (``layers.<i>.mlp.experts.<e>...``) and their
index entries name the expert rank whose file holds them, so any expert-parallel size loads any
other: a rank looks up the experts it holds by name.

The checkpoint's ``meta.json`` indexes every parameter name (global layer ids, so names do not
depend on the pipeline split) with the pipeline stage whose files hold it and its sharding
metadata (``tensor_parallel_dim``, ``partition_stride``, full shape). For each parameter of this
rank's chunks the loader opens the files of that stage with ``safetensors.safe_open`` (memory
mapped, one tensor at a time), and

* same tensor-parallel size and full shape: copies the matching shard as it is;
* otherwise: reads every saved TP shard of that one tensor, unshards it
  (:func:`~megalite.parallel.sharding.unshard_tensors`), fixes the vocabulary padding, and keeps
  this rank's shard (:func:`~megalite.parallel.sharding.shard_tensor`).

Peak extra memory is therefore one full tensor (the largest: the embedding), never the model.

Vocabulary matrices (word embedding, output layer) are padded to a multiple of
``make_vocab_size_divisible_by * tp``, which differs between TP sizes: the ``vocab_size`` real
rows are copied and the padding rows set to zero (:func:`megalite.model.weights.fit_vocab_rows`).
A tied output layer held by the last pipeline stage (``shared_embedding``) is read from the saved
``output_layer.weight`` when the saved layout had one, else from the word embedding (a layout
whose first and last stage coincide).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Iterable

import torch
from safetensors import safe_open

from megalite.checkpoint import io
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.weights import OUTPUT_LAYER, VOCAB_TENSORS, WORD_EMBEDDINGS, fit_vocab_rows
from megalite.parallel.sharding import full_shape, shard_tensor, sharding_of, unshard_tensors

__all__ = ["load_model_weights", "load_model_weights_from", "read_model_config",
           "model_config_from_meta", "read_train_config", "model_file_name"]

# TransformerConfig fields that change what the weights compute; the others (dropout, recompute,
# sequence parallelism, padding multiple, sequence lengths, init) may differ at load time.
_NUMERIC_FIELDS = ("model_type", "num_layers", "hidden_size", "num_attention_heads",
                   "vocab_size", "num_query_groups", "ffn_hidden_size", "kv_channels",
                   "position_embedding_type", "rotary_base", "normalization",
                   "layernorm_epsilon", "activation", "add_bias_linear",
                   "untie_embeddings_and_output_weights", "rope_scaling", "add_qkv_bias",
                   "qk_layernorm",
                   "norm_placement", "bert_binary_head", "tokentypes", "softmax_scale",
                   "relative_attention_num_buckets", "relative_attention_max_distance",
                   "scale_embedding", "scale_decoder_outputs", "decoder_layers",
                   "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
                   "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
                   "moe_router_pre_softmax", "moe_expert_capacity_factor")
_ROPE_SCALING_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                        "rope_original_max_position_embeddings")   # matter with rope_scaling only


def model_file_name(tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
    """File of the model shard held by (tp_rank, pp_rank): ``model_tp00_pp00.safetensors``;
    with expert parallelism, expert rank ``ep_rank > 0``'s experts of that (tp, pp) shard:
    ``model_tp00_pp00_ep01.safetensors`` (expert rank 0's are in the first file, with the
    dense weights; an index entry's ``ep_rank`` says which file holds an expert tensor)."""
    suffix = f"_ep{ep_rank:02d}" if ep_rank else ""
    return f"model_tp{tp_rank:02d}_pp{pp_rank:02d}{suffix}.safetensors"


def read_model_config(directory: str, iteration: int | None = None) -> TransformerConfig:
    """The TransformerConfig a checkpoint was saved with (to build the model before loading weights)."""
    path = _resolve(directory, iteration)
    meta = io.read_json(os.path.join(path, io.META))
    return model_config_from_meta(meta, path)


def read_train_config(directory: str, iteration: int | None = None) -> Any:
    """The checkpoint's ``config.json``: a ``TrainConfig`` when it was saved from one (via
    ``TrainConfig.from_dict``), else the plain dict that was saved."""
    path = _resolve(directory, iteration)
    meta = io.read_json(os.path.join(path, io.META))
    cfg = io.read_json(os.path.join(path, io.CONFIG))
    if meta.get("config_type") == "TrainConfig":
        from megalite.config import TrainConfig   # noqa: PLC0415 (config imports models)
        try:
            return TrainConfig.from_dict(cfg)
        except MegaliteError:
            raise
        except Exception as e:   # a config from another megalite version, say
            raise MegaliteError(f"{os.path.join(path, io.CONFIG)} is not a valid TrainConfig: "
                                f"{type(e).__name__}: {e}") from None
    return cfg


def load_model_weights(directory: str, model_chunks: Iterable[torch.nn.Module], ps: ParallelState,
                       *, iteration: int | None = None, verify_checksums: bool = True) -> Any:
    """Fill this rank's model chunks from the checkpoint in ``directory`` (``latest`` or the given
    ``iteration``), saved under any TP/PP/virtual-stage layout; returns its config
    (:func:`read_train_config`).

    Not collective: every rank reads what it needs. Every file's size is checked against the
    manifest; with ``verify_checksums`` every file this rank reads is hashed first.
    """
    path = _resolve(directory, iteration)
    files = io.verify_manifest(path)
    meta = io.read_json(os.path.join(path, io.META))
    load_model_weights_from(path, meta, files, list(model_chunks), ps,
                            verify_checksums=verify_checksums)
    return read_train_config(path)


def _resolve(directory: str, iteration: int | None) -> str:
    path = io.resolve_checkpoint(directory, iteration)
    if path is None:
        raise MegaliteError(f"no checkpoint found in {directory} (no '{io.LATEST}' file and no "
                            f"complete iter_* directory)")
    return path


def model_config_from_meta(meta: dict, path: str) -> TransformerConfig:
    """The TransformerConfig in a checkpoint's metadata ``meta`` (read from ``path``), checked."""
    raw = meta.get("model_config")
    if not isinstance(raw, dict):
        raise MegaliteError(f"{os.path.join(path, io.META)} has no model_config")
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MegaliteError(f"{os.path.join(path, io.META)}: model_config has fields this "
                            f"megalite does not know: {unknown}")
    return TransformerConfig(**raw)


def check_model_config(saved: TransformerConfig, ours: TransformerConfig, path: str) -> None:
    """MegaliteError listing the fields where the model differs from the checkpoint's."""
    fields = _NUMERIC_FIELDS + (_ROPE_SCALING_FIELDS if saved.rope_scaling or ours.rope_scaling
                                else ())
    diff = [f"{f}: checkpoint {getattr(saved, f)!r}, model {getattr(ours, f)!r}"
            for f in fields if getattr(saved, f) != getattr(ours, f)]
    if diff:
        raise MegaliteError(f"the model does not match checkpoint {path}: " + "; ".join(diff))


class _ShardReader:
    """Lazily opened safetensors files of one checkpoint (checksum verified on first open)."""

    def __init__(self, path: str, files: dict, verify: bool, stack: contextlib.ExitStack):
        self.path, self.files, self.verify, self.stack = path, files, verify, stack
        self.handles: dict[str, Any] = {}

    def get(self, file_name: str, name: str) -> torch.Tensor:
        handle = self.handles.get(file_name)
        full = os.path.join(self.path, file_name)
        if handle is None:
            if file_name not in self.files:
                raise MegaliteError(f"{full} is not in the checkpoint's manifest")
            if self.verify:
                io.verify_checksum(self.path, file_name, self.files)
            try:
                handle = self.stack.enter_context(safe_open(full, framework="pt", device="cpu"))
            except Exception as e:   # SafetensorError, OSError: header unreadable
                raise MegaliteError(f"{full} is not a readable safetensors file: {e}") from None
            self.handles[file_name] = handle
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise MegaliteError(f"{full} does not hold tensor {name!r} the checkpoint index "
                                f"promises: {e}") from None


def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Context in which DeepSpeed ZeRO-3 partitioned parameters (``ds_id``) hold their full
    data; a no-op for ordinary parameters. Collective over the data-parallel group when any
    parameter is partitioned (every rank must enter it with the same parameters).
    ``modifier_rank``: the rank whose in-place changes are kept (None: read only)."""
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed   # noqa: PLC0415 (only for ZeRO-3 models)
    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank)


@torch.no_grad()
def load_model_weights_from(path: str, meta: dict, files: dict, model_chunks: list,
                            ps: ParallelState, *, verify_checksums: bool = True) -> None:
    """:func:`load_model_weights` on an already resolved checkpoint ``path`` (with its parsed
    ``meta.json`` and the manifest entries of :func:`io.verify_manifest`)."""
    saved_config = model_config_from_meta(meta, path)
    for chunk in model_chunks:
        check_model_config(saved_config, chunk.config, path)
    index: dict[str, dict] = meta.get("tensors") or {}
    saved_tp = int(meta["layout"]["tp_size"])
    vocab_size = saved_config.vocab_size
    missing: list[str] = []
    with contextlib.ExitStack() as stack:
        reader = _ShardReader(path, files, verify_checksums, stack)
        for chunk in model_chunks:
            for name, param in chunk.named_parameters():
                # ZeRO-3: gather one parameter at a time; rank 0's copy is re-partitioned.
                with gathered([param], modifier_rank=0):
                    if not _load_one(reader, index, name, param, saved_tp, vocab_size, ps, path):
                        missing.append(name)
    if missing:
        raise MegaliteError(f"checkpoint {path} lacks {len(missing)} parameter(s) of the "
                            f"model: {missing[:6]}")


def _load_one(reader: _ShardReader, index: dict, name: str, param: torch.Tensor, saved_tp: int,
              vocab_size: int, ps: ParallelState, path: str) -> bool:
    """Copy one parameter's shard from the checkpoint; False when the index lacks it."""
    src = name
    if src not in index and name == OUTPUT_LAYER and \
            getattr(param, "shared_embedding", False):
        src = WORD_EMBEDDINGS
    entry = index.get(src)
    if entry is None:
        return False
    dim, stride = sharding_of(param)
    if (entry["tensor_parallel_dim"], entry["partition_stride"]) != (dim, stride):
        raise MegaliteError(
            f"{name}: saved split over dim {entry['tensor_parallel_dim']} (stride "
            f"{entry['partition_stride']}), the model splits dim {dim} (stride "
            f"{stride}); checkpoint {path}")
    pp, ep = int(entry["pp_rank"]), int(entry.get("ep_rank", 0))
    t = reshard_tensor(lambda r: reader.get(model_file_name(r, pp, ep), src), entry, param,
                       saved_tp, vocab_size, ps, name, is_vocab=src in VOCAB_TENSORS)
    if t.shape != param.shape:
        raise MegaliteError(f"{name}: checkpoint shard shape {tuple(t.shape)}, model "
                            f"expects {tuple(param.shape)} (checkpoint {path})")
    param.copy_(t)
    return True


def reshard_tensor(read_shard, entry: dict, param: torch.Tensor, saved_tp: int,
                   vocab_size: int, ps: ParallelState, name: str, *,
                   is_vocab: bool) -> torch.Tensor:
    """This rank's shard of one saved tensor (a parameter, or optimizer state shaped like it).

    ``read_shard(r)`` returns saved tp rank ``r``'s shard; ``entry`` is the tensor's meta.json
    index entry; ``param`` (this rank's parameter) gives the target sharding. Same TP size and
    full shape: shard ``tp_rank`` as stored; otherwise unshard, fix the vocabulary padding, and
    shard for this layout (one full tensor in memory at a time).
    """
    dim, stride = sharding_of(param)
    target = list(full_shape(param, ps.tp_size))
    if saved_tp == ps.tp_size and list(entry["full_shape"]) == target:
        return read_shard(ps.tp_rank if dim is not None else 0)
    ranks = range(saved_tp) if dim is not None else range(1)
    full = unshard_tensors([read_shard(r) for r in ranks], dim, stride)
    if is_vocab:
        full = fit_vocab_rows(full, target[0], vocab_size, f"{name} (checkpoint)")
    if list(full.shape) != target:
        raise MegaliteError(f"{name}: checkpoint full shape {tuple(full.shape)}, model expects "
                            f"{tuple(target)}")
    return shard_tensor(full, dim, stride, ps.tp_rank, ps.tp_size)


def file_metadata(tp_rank: int, pp_rank: int, ps: ParallelState,
                  tensors: dict[str, dict]) -> dict[str, str]:
    """The safetensors header metadata of one model file (strings only): the same per-tensor
    sharding entries as meta.json, so a single file describes itself."""
    return {"format": "megalite-model-shard-1",
            "megalite": json.dumps({"tp_rank": tp_rank, "pp_rank": pp_rank,
                                    "tp_size": ps.tp_size, "pp_size": ps.pp_size,
                                    "tensors": tensors}, sort_keys=True)}
