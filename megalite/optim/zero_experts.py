"""Expert parallelism under ZeRO stages 1 and 2: DeepSpeed's own MoE path, given megalite's
expert groups.

With ``--expert-model-parallel-size EP`` the data-parallel ranks of an expert-parallel group
hold *different* experts under the same optimizer slots, so handing every parameter to
DeepSpeed as one data-parallel group would average (and partition) expert 0 of one rank with
expert 2 of another. DeepSpeed 0.19.8's stage-1/2 optimizer already knows such parameters: a
parameter with ``allreduce == False`` (``deepspeed.moe.utils.is_moe_param``) in a parameter group
marked ``{"moe": True, "name": N}`` is partitioned over, and has its gradient reduced over,
``deepspeed.utils.groups``' expert-data-parallel group ``N``. It switches that path on only when
the wrapped module contains a ``deepspeed.moe.layer.MoE``. So megalite

* registers its own ``ps.ep_group`` / ``ps.expert_dp_group`` in DeepSpeed's group tables under
  DeepSpeed's name ``ep_size_<EP>`` (:func:`register_expert_groups`; DeepSpeed creates no
  groups of its own, so its layout never has to agree with megalite's);
* marks the expert shadows ``allreduce = False`` / ``group_name`` and puts them into their own
  parameter groups (:func:`split_expert_groups`);
* adds an empty :func:`expert_marker` module (a ``MoE`` subclass with no weights, never called)
  to the shadow module, which is what makes DeepSpeed's engine pass the groups on.

What DeepSpeed then computes is megalite's own expert arithmetic (``grad_sync``): the gradient
is divided by the full dp size and summed over the expert-dp group; the global norm sums every
rank's squared partition norms over the full dp group (each expert's partition counted once,
as the ep ranks hold different experts) and over tp x pp, then averages the (equal) expert norm
over the expert-dp group. Stage 3 partitions the model's parameters themselves and would need
DeepSpeed's MoE layers: refused (:func:`refuse_unsupported`).
"""
from __future__ import annotations

from torch import nn

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError

__all__ = ["expert_group_name", "refuse_unsupported", "register_expert_groups",
           "split_expert_groups", "expert_marker"]


def expert_group_name(ps: ParallelState) -> str:
    """DeepSpeed's key for the expert groups (its code parses the size out of this form)."""
    return f"ep_size_{ps.ep_size}"


def refuse_unsupported(zero_stage: int, ep_size: int, zero_config: dict | None = None) -> None:
    """MegaliteError for a ZeRO setting that cannot run with expert parallelism (``ep_size`` >
    1): stage 3, or stage 1/2 with ``reduce_scatter`` switched off (DeepSpeed's MoE path
    reduces expert gradients only through its reduce-scatter)."""
    if ep_size <= 1 or zero_stage == 0:
        return
    if zero_stage == 3:
        raise MegaliteError(
            f"--zero-stage 3 with --expert-model-parallel-size {ep_size} is not supported "
            f"(ZeRO-3 would partition each rank's different experts as one parameter over the "
            f"data-parallel group); use --zero-stage 1 or 2 with expert parallelism")
    if zero_config is not None and not zero_config.get("reduce_scatter", True):
        raise MegaliteError(
            f"--deepspeed-config: zero_optimization.reduce_scatter = false cannot be combined "
            f"with --expert-model-parallel-size {ep_size} (DeepSpeed reduces expert gradients "
            f"over the expert-data-parallel group only with reduce_scatter); remove the key")


def register_expert_groups(ps: ParallelState) -> str:
    """Put ``ps``'s expert-parallel and expert-data-parallel groups into DeepSpeed's tables
    (replacing whatever an earlier run in this process left there) and return their name."""
    from deepspeed.utils import groups

    name = expert_group_name(ps)
    tables = (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
              groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS)
    for table in tables:
        table.clear()
    groups._EXPERT_PARALLEL_GROUP[name] = ps.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(ps.ep_group_ranks)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = ps.expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(ps.expert_dp_group_ranks)
    return name


def split_expert_groups(opt_groups: list[dict], experts: set[int], name: str) -> list[dict]:
    """``opt_groups`` (``{"params": shadows, "weight_decay"}``) with the shadows whose ``id`` is
    in ``experts`` moved to groups of their own (same weight decay) marked for DeepSpeed's MoE
    path; each such shadow gets ``allreduce = False`` and ``group_name``. Order kept within
    each group; empty groups dropped."""
    dense, moe = [], []
    for g in opt_groups:
        mine = [p for p in g["params"] if id(p) in experts]
        rest = [p for p in g["params"] if id(p) not in experts]
        for p in mine:
            p.allreduce, p.group_name = False, name
        if rest:
            dense.append({"params": rest, "weight_decay": g["weight_decay"]})
        if mine:
            moe.append({"params": mine, "weight_decay": g["weight_decay"], "moe": True,
                        "name": name})
    return dense + moe


def expert_marker(num_experts: int) -> nn.Module:
    """An empty ``deepspeed.moe.layer.MoE`` (no parameters, never called): its presence in the
    module given to ``deepspeed.initialize`` turns on DeepSpeed's MoE handling of the groups
    above. ``set_deepspeed_parallelism`` is a no-op: the groups are megalite's."""
    from deepspeed.moe.layer import MoE

    class ExpertGroupsMarker(MoE):
        def __init__(self):
            nn.Module.__init__(self)   # none of MoE's layers: only the type and num_experts
            self.num_experts = num_experts

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
            return None

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise MegaliteError("the ZeRO expert-group marker is not a layer")

    return ExpertGroupsMarker()
