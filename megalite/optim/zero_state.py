"""ZeRO optimizer state by parameter name: what lets it follow a change of layout or ZeRO stage.

DeepSpeed keeps each rank's share of the fp32 master weights and AdamW moments as flat
*partitions*: per parameter group (stages 1/2) or sub-group (stage 3), one 1-D tensor per rank,
into which every parameter contributes a contiguous *fragment* (possibly none). Those partitions
are saved as they are, so a same-layout resume is exact; to move the state to another data
parallel size, tensor/pipeline split or ZeRO stage it must be taken apart by parameter.

A *fragment map* says, for each parameter this rank holds a piece of::

    name -> (slot, hp_start, lp_start, numel)

``slot`` is the partition (group index, stages 1/2; sub-group index, stage 3), ``hp_start`` the
fragment's offset in it, ``lp_start`` its offset in the flattened parameter (this rank's tensor
parallel shard of it), ``numel`` its length. It is read from DeepSpeed's own bookkeeping
(``param._hp_mapping`` for stages 1/2; the parameters' ``ds_tensor`` views into the flat
sub-group buffers for stage 3, located by address), and it is saved with the state
(:func:`portable_index`), so reassembling a parameter's state from the saved ranks
(:func:`saved_param_state`) needs no knowledge of DeepSpeed's alignment or padding rules. Loading
(:class:`ParamStateLoader`) writes a parameter's full tensors through the same map of the live
optimizer, one parameter at a time.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from megalite.errors import MegaliteError

__all__ = ["fragment_map", "portable_index", "saved_param_state", "ParamStateLoader", "MOMENTS"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def _slot_masters(zero) -> list[torch.Tensor]:
    """The live fp32 master partitions, one per slot (what the base AdamW updates)."""
    ds = zero.ds_optimizer
    return list(ds.fp32_partitioned_groups_flat if zero.zero_stage == 3
                else ds.single_partition_of_fp32_groups)


def fragment_map(zero) -> dict[str, tuple[int, int, int, int]]:
    """``{name: (slot, hp_start, lp_start, numel)}`` of this rank's live ZeRO optimizer
    ``zero`` (a :class:`~megalite.optim.zero.ZeroOptimizer`). Parameters of which this rank holds
    nothing are absent. Not collective."""
    ds, out = zero.ds_optimizer, {}
    masters = _slot_masters(zero)
    if zero.zero_stage == 3:
        names = {id(p): n for n, p in zip(zero.param_names, zero.params)}
        dp_rank = zero.ps.dp_rank
        for slot, group in enumerate(ds.fp16_groups):
            base = ds.fp16_partitioned_groups_flat[slot]
            for p in group:
                part = p.ds_tensor
                hp = (part.data_ptr() - base.data_ptr()) // part.element_size()
                size = part.ds_numel          # every rank's share, padding included
                lp = dp_rank * size
                numel = max(0, min(size, p.ds_numel - lp))
                if numel:
                    out[names[id(p)]] = (slot, hp, lp, numel)
    else:
        for name, shadow in zip(zero.param_names, zero.shadows):
            m = getattr(shadow, "_hp_mapping", None)
            if m is None:
                continue
            slot, hp = m.param_group_index, m.hp_fragment_address.start
            numel = m.lp_fragment_address.numel
            # DeepSpeed's fragment must be a view of the partition at the offset we record;
            # anything else means its bookkeeping changed and the map would be wrong.
            if m.hp_fragment.data_ptr() != masters[slot][hp:].data_ptr() or \
                    m.hp_fragment_address.numel != numel:
                raise MegaliteError(f"DeepSpeed's fragment of {name} is not where its mapping "
                                    f"says; this DeepSpeed version is not supported for "
                                    f"resharding ZeRO state")
            out[name] = (slot, hp, m.lp_fragment_address.start, numel)
    for name, (slot, hp, _, numel) in out.items():
        if hp < 0 or hp + numel > masters[slot].numel():
            raise MegaliteError(f"ZeRO fragment of {name} lies outside its partition")
    return out


def _slot_state_keys(zero) -> list[int]:
    """Index of each slot's entry in the saved base-optimizer ``state`` dict. Stages 1/2: the
    group index. Stage 3: DeepSpeed lists the sub-groups under their parameter group, in
    sub-group order, and torch numbers the parameters group by group."""
    ds = zero.ds_optimizer
    n = len(_slot_masters(zero))
    if zero.zero_stage != 3:
        return list(range(n))
    order = [s for g in range(len(ds.optimizer.param_groups)) for s in range(n)
             if ds.sub_group_to_group_id[s] == g]
    return [order.index(s) for s in range(n)]


def portable_index(zero) -> dict:
    """Plain data saved beside DeepSpeed's state: the fragment map, this rank's shape of every
    parameter, the slot -> state-key list and whether the run keeps bf16 weights."""
    shapes = {}
    for name, p in zip(zero.param_names, zero.params):
        shapes[name] = list(getattr(p, "ds_shape", None) or p.shape)
    return {"fragments": {n: list(f) for n, f in fragment_map(zero).items()},
            "shapes": shapes, "slot_keys": _slot_state_keys(zero),
            "half": zero.dtype != torch.float32, "loss_scale": zero._ds_scale()}


def _saved_slot(state: dict, slot: int) -> tuple[torch.Tensor, dict]:
    """(fp32 master partition, AdamW state) of ``slot`` in a saved ZeroOptimizer state."""
    ds, keys = state["deepspeed"], state["portable"]["slot_keys"]
    if state["zero_stage"] == 3:
        master, adam = ds["fp32_flat_groups"][slot], ds["optimizer_state_dict"]["state"]
    else:
        master, adam = ds["single_partition_of_fp32_groups"][slot], \
            ds["base_optimizer_state"]["state"]
    return master, adam.get(keys[slot], {})


def saved_param_state(states: list[dict], name: str, where: str) -> dict[str, Any] | None:
    """One parameter's full state (this tensor-parallel shard) from the saved ZeroOptimizer
    states of every data-parallel rank of its (tp, pp) group: ``{"master", "exp_avg",
    "exp_avg_sq", "step"}`` (moments and step only once a step was taken), or None when the
    states do not name it. ``where`` names the files in errors."""
    shape = states[0]["portable"]["shapes"].get(name)
    if shape is None:
        return None
    numel = math.prod(shape)
    out: dict[str, Any] = {"master": torch.zeros(numel, dtype=torch.float32)}
    covered = 0
    for state in states:
        frag = state["portable"]["fragments"].get(name)
        if frag is None:
            continue
        slot, hp, lp, n = frag
        master, adam = _saved_slot(state, slot)
        out["master"][lp:lp + n] = master[hp:hp + n]
        for key in MOMENTS:
            if key in adam:
                out.setdefault(key, torch.zeros(numel, dtype=torch.float32))
                out[key][lp:lp + n] = adam[key][hp:hp + n]
        if "step" in adam:
            out["step"] = adam["step"].clone() if torch.is_tensor(adam["step"]) else adam["step"]
        covered += n
    if covered != numel:
        raise MegaliteError(f"{where}: the ZeRO partitions cover {covered} of the {numel} "
                            f"elements of {name} (a rank file of the data-parallel group is "
                            f"missing or from another run)")
    if any(k in out for k in MOMENTS) and not all(k in out for k in (*MOMENTS, "step")):
        raise MegaliteError(f"{where}: incomplete AdamW state for {name}")
    return {k: v.view(shape) if torch.is_tensor(v) and v.dim() else v for k, v in out.items()}


class ParamStateLoader:
    """Writes per-parameter state into the partitions of a live ZeroOptimizer, one parameter
    at a time, so a rank never holds more than one parameter's full state beside its own
    partitions. Only the parameters this rank holds a fragment of are asked for (:attr:`names`).

    ``write(name, state)``: ``state`` is this rank's tensor-parallel shard of the parameter's
    ``{"master", "exp_avg", "exp_avg_sq", "step"}`` (as :func:`saved_param_state` returns it); a
    missing ``"master"`` (fp32 runs without ZeRO keep none) is taken from the loaded weights.
    Not collective. ``check()`` (not collective either) raises if anything is missing or
    inconsistent; ``apply()`` then sets the step count and rebuilds the model's weights from the
    masters: collective over the dp group (stages 1/2 all-gather the weights), so it runs only
    after every rank's ``check()`` passed.
    """

    def __init__(self, zero):
        self.zero = zero
        self.masters = _slot_masters(zero)
        self.frags = fragment_map(zero)
        self.params = dict(zip(zero.param_names, zero.params))
        self.slot_states: list[dict] | None = None
        self.steps: set[float] = set()
        self.written: set[str] = set()
        self.with_moments: bool | None = None
        self.loss_scale: float | None = None   # fp16: the saved scale, set by the caller

    @property
    def names(self):
        """The parameters this rank holds a fragment of (a live view of the map's keys)."""
        return self.frags.keys()

    def _init_moments(self) -> None:
        self.slot_states = []
        for master in self.masters:
            st = self.zero.ds_optimizer.optimizer.state[master]
            st.clear()
            st.update({"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(master),
                       "exp_avg_sq": torch.zeros_like(master)})
            self.slot_states.append(st)

    @torch.no_grad()
    def write(self, name: str, state: dict[str, Any]) -> None:
        slot, hp, lp, n = self.frags[name]
        has_moments = all(k in state for k in MOMENTS)
        if self.with_moments is None:
            self.with_moments = has_moments
            if has_moments:
                self._init_moments()
        elif has_moments != self.with_moments:
            raise MegaliteError(f"optimizer state of {name} has AdamW moments "
                                f"{'but' if has_moments else 'missing while'} others "
                                f"{'do not' if has_moments else 'have them'}")
        master = state.get("master")
        if master is None:      # fp32 weights are the masters
            p = self.params[name]
            piece = p.ds_tensor.view(-1)[:n] if self.zero.zero_stage == 3 else p.view(-1)[lp:lp + n]
        else:
            piece = master.reshape(-1)[lp:lp + n]
        self.masters[slot][hp:hp + n].copy_(piece)
        if has_moments:
            for key in MOMENTS:
                self.slot_states[slot][key][hp:hp + n].copy_(state[key].reshape(-1)[lp:lp + n])
            self.steps.add(float(state["step"]))
        self.written.add(name)

    def check(self) -> None:
        missing = self.names - self.written
        if missing:
            raise MegaliteError(f"no optimizer state for parameters {sorted(missing)[:5]}")
        if self.with_moments and len(self.steps) != 1:
            raise MegaliteError(f"optimizer state has differing step counts "
                                f"{sorted(self.steps)}")

    @torch.no_grad()
    def apply(self) -> None:
        if self.with_moments:
            step = next(iter(self.steps))
            for st in self.slot_states:
                st["step"] = torch.tensor(step, dtype=torch.float32)   # torch AdamW's form
        ds = self.zero.ds_optimizer
        if self.zero.fp16 and self.loss_scale is not None:
            # the scale carries over; the overflow/growth counters start afresh
            ds.loss_scaler.cur_scale = float(self.loss_scale)
        if self.zero.zero_stage == 3:
            for lp_flat, master in zip(ds.fp16_partitioned_groups_flat, self.masters):
                lp_flat.data.copy_(master.data)
        else:
            ds.update_lp_params()      # fp32 partitions -> weights, all-gathered over dp
        self.zero._realias()
