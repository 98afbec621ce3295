"""Optimizer state of megalite's :class:`~megalite.optim.optimizer.Optimizer` under a new layout.

Adam's moments (and the fp32 master weights of bf16/fp16 runs) have exactly the shape of the
parameter they belong to and are split over tensor parallelism the same way, so they reshard
like the weights (:func:`megalite.checkpoint.reshard.reshard_tensor`). The optimizer's state is
keyed by parameter *name* (its ``param_names``), so a new pipeline split, virtual stages or data
parallel size only change which rank file a name is read from:

* the saved state of a name lives in the rank files of data-parallel rank 0 of the saved
  ``(tp, pp_rank of the name)`` ranks (megalite's optimizer replicates state over DP);
* the step count and the loss scaler are global (the same on every rank) and are copied.

ZeRO's partitioned state (``zero_stage`` in the state) is not handled here: it is refused with a
clear error (issue 5's follow-up). Rank files are opened with ``torch.load(mmap=True,
weights_only=True)``, so only the tensors this rank needs are paged in.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from megalite.checkpoint import io
from megalite.checkpoint.reshard import (OUTPUT_LAYER, VOCAB_TENSORS, WORD_EMBEDDINGS,
                                         reshard_tensor)
from megalite.distributed.parallel_state import ParallelState, rank_layout
from megalite.errors import MegaliteError

__all__ = ["reshardable", "reshard_optimizer_state"]

_KEYS = {"adamw", "masters", "scaler", "param_names"}


def reshardable(state: Any) -> bool:
    """True for megalite Optimizer state (AdamW by parameter name), False for anything else
    (ZeRO partitions, a plain torch optimizer without names)."""
    return isinstance(state, dict) and _KEYS <= set(state) and "zero_stage" not in state


def _per_name(state: dict, where: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {"step", "exp_avg", "exp_avg_sq", ["master"]}}`` from one rank's state."""
    names, adam = state["param_names"], state["adamw"]["state"]
    out = {}
    for i, name in enumerate(names):
        entry = dict(adam.get(i, {}))
        if state["masters"] is not None:
            entry["master"] = state["masters"][i]
        out[name] = entry
    if not out:
        raise MegaliteError(f"{where}: optimizer state names no parameters")
    return out


@torch.no_grad()
def reshard_optimizer_state(path: str, meta: dict, files: dict, model_chunks: list,
                            optimizer: Any, ps: ParallelState, *, rank_file: Callable[[int], str],
                            verify_checksums: bool = True) -> None:
    """Load the optimizer state of checkpoint ``path`` (saved under another layout) into
    ``optimizer`` (a megalite Optimizer over ``model_chunks``). Not collective."""
    template = optimizer.state_dict()
    if not reshardable(template):
        raise MegaliteError("this run's optimizer state cannot be resharded (only megalite's "
                            "own optimizer, not ZeRO, loads under a different layout yet)")
    saved = meta["layout"]
    layout = rank_layout(saved["world_size"], saved["tp_size"], saved["pp_size"])
    index = meta["tensors"]
    vocab_size = int(meta["model_config"]["vocab_size"])
    cache: dict[int, dict] = {}

    def states_of(rank: int) -> dict:
        if rank not in cache:
            name = rank_file(rank)
            if verify_checksums:
                io.verify_checksum(path, name, files)
            state = io.safe_torch_load(os.path.join(path, name), mmap=True)
            opt = state.get("optimizer") if isinstance(state, dict) else None
            if not reshardable(opt):
                kind = ("none was saved" if opt is None else "ZeRO partitions"
                        if isinstance(opt, dict) and "zero_stage" in opt
                        else "not megalite Optimizer state")
                raise MegaliteError(f"{os.path.join(path, name)}: its optimizer state ({kind}) "
                                    f"cannot be resharded to another layout; load the weights "
                                    f"only (load_optimizer=False)")
            cache[rank] = {"names": _per_name(opt, name), "scaler": opt["scaler"],
                           "half": opt["masters"] is not None}
        return cache[rank]

    params = {n: p for c in model_chunks for n, p in c.named_parameters()}
    names = template["param_names"]
    new_state: dict[int, dict] = {}
    masters: list[torch.Tensor] = []
    scaler = None
    for i, name in enumerate(names):
        param = params[name]
        src = name
        if src not in index and name == OUTPUT_LAYER and getattr(param, "shared_embedding", False):
            src = WORD_EMBEDDINGS     # both tied copies get the same summed gradient
        entry = index.get(src)
        if entry is None:
            raise MegaliteError(f"checkpoint {path} has no state for parameter {name}")
        pp = int(entry["pp_rank"])

        def saved_state(tp_rank: int, pp=pp, src=src) -> dict:
            found = states_of(layout.rank_of(tp_rank, 0, pp))
            if src not in found["names"]:
                where = os.path.join(path, rank_file(layout.rank_of(tp_rank, 0, pp)))
                raise MegaliteError(f"{where} has no optimizer state for {src}")
            return found
        first = saved_state(0)
        if first["half"] != (template["masters"] is not None):
            raise MegaliteError(f"checkpoint {path} was saved with a different precision "
                                f"(bf16/fp16 keep fp32 master weights, fp32 does not)")
        scaler = first["scaler"]
        entry_state: dict[str, torch.Tensor] = {}
        for key, value in first["names"][src].items():
            if key == "step" or not isinstance(value, torch.Tensor) or value.dim() == 0:
                entry_state[key] = value.clone() if isinstance(value, torch.Tensor) else value
                continue
            entry_state[key] = reshard_tensor(
                lambda r, key=key: saved_state(r)["names"][src][key], entry, param,
                int(saved["tp_size"]), vocab_size, ps, f"{name} ({key})",
                is_vocab=src in VOCAB_TENSORS).clone()
        master = entry_state.pop("master", None)
        if template["masters"] is not None:
            masters.append(master)
        if entry_state:
            new_state[i] = entry_state
    optimizer.load_state_dict({
        "adamw": {"state": new_state, "param_groups": template["adamw"]["param_groups"]},
        "masters": masters if template["masters"] is not None else None,
        "scaler": scaler, "param_names": names})
