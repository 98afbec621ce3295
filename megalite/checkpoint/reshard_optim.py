"""Optimizer state saved under one layout, loaded under another, by parameter name.

Adam's moments and the fp32 master weights have exactly the shape of the parameter they belong
to and are split over tensor parallelism the same way, so they reshard like the weights
(:func:`megalite.checkpoint.reshard.reshard_tensor`). Every optimizer state is therefore first
seen as ``{name: {"master", "exp_avg", "exp_avg_sq", "step"}}`` per saved (tp, pp) rank:

* megalite's own :class:`~megalite.optim.optimizer.Optimizer` replicates its state over data
  parallelism and keys it by parameter name: a name's state is read from the rank file of data
  parallel rank 0 of the saved ``(tp, pp_rank of the name)`` (an expert's: of data-parallel
  rank ``ep_rank`` of its index entry, the expert rank that held it);
* a :class:`~megalite.optim.zero.ZeroOptimizer` (any stage) partitions it over the data
  parallel ranks: a name's state is reassembled from the files of *all* data-parallel ranks of
  that (tp, pp), through the fragment map saved with it (:mod:`megalite.optim.zero_state`).

The target is either kind too: megalite's optimizer gets a state dict of its own format, a ZeRO
optimizer writes each name's tensors into its partitions. So a new TP/PP split, virtual stages,
data-parallel size or ZeRO stage (0 <-> 1/2/3, 1 <-> 3, ...) all load. The precision must stay
(bf16 runs keep fp32 masters, fp32 runs without ZeRO do not: their masters are the weights).
fp16's loss scale carries over between the two kinds; their overflow/growth counters, kept in
different forms, start afresh.
Rank files are opened with ``torch.load(mmap=True, weights_only=True)``, so only the tensors
this rank needs are paged in; ZeRO state is reassembled one parameter at a time, and a ZeRO
target builds only the parameters it holds a fragment of and writes each into its partitions
at once (memory: one parameter's full state beside the rank's own partitions).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from megalite.checkpoint import io
from megalite.checkpoint.reshard import reshard_tensor
from megalite.distributed.parallel_state import ParallelState, rank_layout
from megalite.errors import MegaliteError
from megalite.model.weights import OUTPUT_LAYER, VOCAB_TENSORS, WORD_EMBEDDINGS
from megalite.optim.base import TrainingOptimizer

__all__ = ["reshardable", "is_zero_state", "is_zero_optimizer", "accepts_resharded",
           "reshard_optimizer_state"]

_KEYS = {"adamw", "masters", "scaler", "param_names"}


def is_zero_state(state: Any) -> bool:
    """True for a saved ZeroOptimizer state that carries its fragment map."""
    return isinstance(state, dict) and "zero_stage" in state and "portable" in state


def reshardable(state: Any) -> bool:
    """True for saved optimizer state this module can move to another layout: megalite's
    Optimizer (AdamW by parameter name) or ZeRO partitions with their fragment map."""
    return (isinstance(state, dict) and _KEYS <= set(state) and "zero_stage" not in state) \
        or is_zero_state(state)


def accepts_resharded(optimizer: Any) -> bool:
    """True if ``optimizer`` can take state resharded by name: a megalite
    :class:`~megalite.optim.base.TrainingOptimizer` (megalite's AdamW or ZeRO), not e.g. a
    plain torch optimizer."""
    return isinstance(optimizer, TrainingOptimizer)


def is_zero_optimizer(optimizer: Any) -> bool:
    """A ZeroOptimizer: a TrainingOptimizer whose declared ``zero_stage`` is 1, 2 or 3."""
    return isinstance(optimizer, TrainingOptimizer) and optimizer.zero_stage > 0


class _Source:
    """The saved optimizer state of one (tp_rank, pp_rank), by parameter name."""

    def __init__(self, states: list[dict], files: list[str]):
        self.states, self.files = states, files
        first = states[0]
        self.zero = is_zero_state(first)
        if self.zero:
            self.half = bool(first["portable"]["half"])
            self.scaler = None
            self.loss_scale = first["portable"].get("loss_scale")
            self.names = set(first["portable"]["shapes"])
        else:
            self.half = first["masters"] is not None
            self.scaler = first["scaler"]
            self.loss_scale = (first["scaler"] or {}).get("scale") \
                if isinstance(first["scaler"], dict) else None
            self.names = set(first["param_names"])
        self._cached: tuple[str, dict] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> dict[str, Any]:
        if self._cached is None or self._cached[0] != name:
            self._cached = (name, self._load(name))
        return self._cached[1]

    def _load(self, name: str) -> dict[str, Any]:
        if self.zero:
            from megalite.optim.zero_state import saved_param_state
            return saved_param_state(self.states, name, " / ".join(self.files))
        state = self.states[0]
        i = state["param_names"].index(name)
        entry = dict(state["adamw"]["state"].get(i, {}))
        if state["masters"] is not None:
            entry["master"] = state["masters"][i]
        return entry


class _SavedStates:
    """Rank files of a checkpoint, opened on demand, grouped into :class:`_Source` per (tp,
    pp) rank of the saved layout."""

    def __init__(self, path: str, meta: dict, files: dict, rank_file: Callable[[int], str],
                 verify_checksums: bool):
        saved = meta["layout"]
        self.path, self.files, self.rank_file = path, files, rank_file
        self.verify = verify_checksums
        self.layout = rank_layout(saved["world_size"], saved["tp_size"], saved["pp_size"],
                                  saved.get("cp_size", 1))
        self._sources: dict[tuple[int, int], _Source] = {}

    def _optimizer_state(self, rank: int) -> dict:
        name = self.rank_file(rank)
        if name not in self.files:
            raise MegaliteError(f"{os.path.join(self.path, name)} is missing: the checkpoint "
                                f"holds no optimizer state for rank {rank}")
        if self.verify:
            io.verify_checksum(self.path, name, self.files)
        state = io.safe_torch_load(os.path.join(self.path, name), mmap=True)
        opt = state.get("optimizer") if isinstance(state, dict) else None
        if not reshardable(opt):
            kind = ("none was saved" if opt is None else
                    "ZeRO partitions without a fragment map (saved by an older megalite)"
                    if isinstance(opt, dict) and "zero_stage" in opt
                    else "not megalite or ZeRO optimizer state")
            raise MegaliteError(f"{os.path.join(self.path, name)}: its optimizer state ({kind}) "
                                f"cannot be resharded to another layout; load the weights "
                                f"only (load_optimizer=False)")
        return opt

    def source(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> _Source:
        key = (tp_rank, pp_rank, ep_rank)
        if key not in self._sources:
            # expert parallelism: dp rank e held expert rank e's experts (ZeRO: each
            # expert's state is partitioned over the dp ranks holding that expert; the
            # fragment maps of the others do not name it)
            rank0 = self.layout.rank_of(tp_rank, ep_rank, pp_rank)
            first = self._optimizer_state(rank0)
            ranks = [rank0]
            if is_zero_state(first):    # partitioned: every dp rank holds a piece
                ranks += [self.layout.rank_of(tp_rank, d, pp_rank)
                          for d in range(self.layout.dp_size) if d != ep_rank]
            states = [first] + [self._optimizer_state(r) for r in ranks[1:]]
            if any(is_zero_state(s) != is_zero_state(first) for s in states):
                raise MegaliteError(f"checkpoint {self.path}: the data-parallel ranks of tp "
                                    f"{tp_rank} pp {pp_rank} hold different kinds of optimizer "
                                    f"state")
            self._sources[key] = _Source(states, [self.rank_file(r) for r in ranks])
        return self._sources[key]


def _shape_proxy(param: torch.Tensor) -> torch.Tensor:
    """``param`` itself, or for a ZeRO-3 partitioned parameter (empty locally) a meta tensor of
    its full shape carrying the same sharding attributes."""
    if not hasattr(param, "ds_shape"):
        return param
    proxy = torch.empty(param.ds_shape, device="meta")
    for attr in ("tensor_parallel_dim", "partition_stride", "shared_embedding"):
        if hasattr(param, attr):
            setattr(proxy, attr, getattr(param, attr))
    return proxy


@torch.no_grad()
def reshard_optimizer_state(path: str, meta: dict, files: dict, model_chunks: list,
                            optimizer: Any, ps: ParallelState, *, rank_file: Callable[[int], str],
                            verify_checksums: bool = True,
                            defer: bool = False) -> Callable[[], None] | None:
    """Load the optimizer state of checkpoint ``path`` (saved under another layout, or by
    another kind of optimizer) into ``optimizer`` (megalite's Optimizer or a ZeroOptimizer over
    ``model_chunks``). Loading into ZeRO is collective over the dp group; with ``defer`` that
    part is returned as a function to call on every rank (a megalite Optimizer target is
    loaded at once and None returned). What can fail on one rank alone is checked before the
    collective part."""
    if not accepts_resharded(optimizer):
        raise MegaliteError("this run's optimizer cannot take state saved under another layout "
                            "(only megalite's optimizer and ZeRO can)")
    zero_target = is_zero_optimizer(optimizer)
    template = None if zero_target else optimizer.state_dict()
    names = optimizer.param_names
    half = (optimizer.dtype != torch.float32) if zero_target else template["masters"] is not None
    saved_states = _SavedStates(path, meta, files, rank_file, verify_checksums)
    saved_tp = int(meta["layout"]["tp_size"])
    index = meta["tensors"]
    vocab_size = int(meta["model_config"]["vocab_size"])

    params = {n: p for c in model_chunks for n, p in c.named_parameters()}
    # A ZeRO target takes each parameter's state as soon as it is built and only asks for the
    # parameters this rank holds a fragment of; megalite's optimizer needs them all at once.
    loader = optimizer.param_state_loader() if zero_target else None
    per_name: dict[str, dict[str, Any]] = {}
    scaler = loss_scale = None
    for name in names:
        if loader is not None and name not in loader.names:
            continue
        param = params[name]
        src = name
        if src not in index and name == OUTPUT_LAYER and getattr(param, "shared_embedding", False):
            src = WORD_EMBEDDINGS     # both tied copies get the same summed gradient
        entry = index.get(src)
        if entry is None:
            raise MegaliteError(f"checkpoint {path} has no state for parameter {name}")
        pp, ep = int(entry["pp_rank"]), int(entry.get("ep_rank", 0))

        def source(tp_rank: int, pp=pp, ep=ep, src=src) -> _Source:
            found = saved_states.source(tp_rank, pp, ep)
            if src not in found:
                raise MegaliteError(f"{', '.join(os.path.join(path, f) for f in found.files)} "
                                    f"has no optimizer state for {src}")
            return found
        first = source(0)
        if first.half != half:
            raise MegaliteError(f"checkpoint {path} was saved with a different precision "
                                f"(bf16/fp16 keep fp32 master weights, fp32 does not)")
        scaler, loss_scale = first.scaler, first.loss_scale
        state: dict[str, Any] = {}
        for key, value in first[src].items():
            if key == "step" or not isinstance(value, torch.Tensor) or value.dim() == 0:
                state[key] = value.clone() if isinstance(value, torch.Tensor) else value
                continue
            state[key] = reshard_tensor(
                lambda r, key=key: source(r)[src][key], entry, _shape_proxy(param), saved_tp,
                vocab_size, ps, f"{name} ({key})", is_vocab=src in VOCAB_TENSORS).clone()
        if not half:
            state.pop("master", None)     # fp32: the loaded weights are the masters
        if loader is not None:
            loader.write(name, state)
        else:
            per_name[name] = state

    if loader is not None:
        if loss_scale is None and not loader.names:   # a rank without fragments: any stage's
            loss_scale = saved_states.source(0, 0).loss_scale
        loader.loss_scale = loss_scale
        loader.check()
        if defer:
            return loader.apply
        loader.apply()
        return None
    new_state, masters = {}, []
    for i, name in enumerate(names):
        state = dict(per_name[name])
        master = state.pop("master", None)
        if half:
            masters.append(master)
        if state:
            new_state[i] = state
    if scaler is None:    # from ZeRO: this run's scaler, at the saved scale (fp16)
        scaler = dict(template["scaler"])
        if loss_scale is not None and "scale" in scaler:
            scaler["scale"] = float(loss_scale)
    optimizer.load_state_dict({
        "adamw": {"state": new_state, "param_groups": template["adamw"]["param_groups"]},
        "masters": masters if half else None, "scaler": scaler, "param_names": names})
    return None
