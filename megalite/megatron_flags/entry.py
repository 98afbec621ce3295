"""The entries of the Megatron-LM flag tables: kinds, :class:`MegatronFlag`, shared reasons."""
from __future__ import annotations

from dataclasses import dataclass

SAME, NOTICE, REFUSE, COND = "same", "notice", "refuse", "cond"


@dataclass(frozen=True)
class MegatronFlag:
    """One Megatron-LM flag megalite handles its own way (see the module docstring)."""

    flags: tuple[str, ...]
    """Its spellings, the first being its name."""
    kind: str
    """SAME, NOTICE, REFUSE or COND."""
    nargs: object
    """0 (a switch), None (one value) or "+" (a list), as Megatron-LM parses it."""
    text: str
    """NOTICE: what megalite does instead; REFUSE/COND: why it is refused; SAME: why it is."""
    ok: tuple[str, ...] = ()
    """COND: the values accepted silently."""


# Reasons and notices that several flags share.
KERNELS = "megalite runs PyTorch's own operations (nothing to fuse or unfuse)"
ATTENTION = ("megalite's attention is torch.nn.functional.scaled_dot_product_attention, which "
             "picks its flash, memory-efficient or plain kernel itself")
OVERLAP = ("megalite reduces the gradients after the backward pass and does not overlap "
           "communication with computation yet")
CKPT_FORMAT = ("megalite writes its own checkpoint format: every rank its shard, "
               "synchronously, loadable under any layout")
NO_PROFILER = "megalite has no profiler hooks; profile the whole process instead"
LOG_ONLY = "megalite does not log this (its log line: loss, lr, grad norm, loss scale, " \
           "throughput, MFU, peak memory)"
FSDP = "fully sharded data parallelism is not implemented; --zero-stage 3 shards parameters"
OFFLOAD = "offloading to CPU memory is not implemented"
NO_DATALOADER = ("megalite has no DataLoader: the batches are cut in the training process "
                 "from memory-mapped token files")
NUMERICS = "megalite does not implement it, and training without it gives other numbers"


def flag(flags: str, kind: str, nargs, text: str, ok=()) -> "MegatronFlag":
    """One entry: ``flags`` space-separated spellings, the rest as in :class:`MegatronFlag`."""
    return MegatronFlag(tuple(flags.split()), kind, nargs, text, tuple(ok))


def same_reason(kind: str, nargs, text: str, *flags: str) -> list["MegatronFlag"]:
    """Entries that share kind, arguments and reason (each of ``flags`` as in :func:`flag`)."""
    return [flag(f, kind, nargs, text) for f in flags]

