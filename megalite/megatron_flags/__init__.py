"""Megatron-LM flags that ``megalite train`` does not implement as such, and what it does with
each: a launch script written for Megatron-LM runs unchanged where the result is the same, and
stops at once, naming the flag and the reason, where it would not be.

Kinds:

* ``SAME``: accepted silently; megalite already does what the flag asks (e.g.
  ``--accumulate-allreduce-grads-in-fp32``: megalite's gradients are always fp32).
* ``NOTICE``: accepted; a performance or bookkeeping choice megalite makes itself. Rank 0
  prints one line saying what megalite does instead (``notice: --use-flash-attn: ...``).
* ``REFUSE``: refused with ``--flag: <reason>`` (exit 2): the run would differ from Megatron's.
* ``COND``: accepted silently with a value in ``ok`` (the value that changes nothing, e.g.
  ``--context-parallel-size 1``), refused otherwise.

Whole families (``--moe-*``, ``--fp8-*``, ...) are refused by prefix (:data:`FAMILIES`).
The flags megalite implements are in :mod:`megalite.train_flags`; anything else is an unknown
flag. Sources: Megatron-LM's ``megatron/training/arguments.py`` (core_v0.16.1) and its GPT and
LLaMA example scripts.
"""
from __future__ import annotations

import argparse

from megalite.errors import ConfigError
from megalite.megatron_flags import model_flags, run_flags, system_flags
from megalite.megatron_flags.entry import COND, NOTICE, REFUSE, SAME, MegatronFlag

# (group title, flags): the group titles are Megatron-LM's argument groups.
GROUPS: list[tuple[str, list[MegatronFlag]]] = (run_flags.GROUPS + system_flags.GROUPS
                                                + model_flags.GROUPS)

# Flag prefixes refused as a whole: (prefix, reason).
FAMILIES: list[tuple[str, str]] = [
    ("--moe-", "mixture-of-experts options other than megalite's are not implemented "
               "(megalite's: --num-experts, "
               "--moe-router-topk, --moe-ffn-hidden-size, --moe-layer-freq, "
               "--moe-shared-expert-*, --moe-router-load-balancing-type, --moe-aux-loss-coeff, "
               "--moe-z-loss-coeff, --moe-router-pre-softmax, --moe-expert-capacity-factor)"),
    ("--fp8-", "FP8 training (Transformer Engine) is not implemented; megalite trains in "
               "fp32, bf16 or fp16"),
    ("--fp4-", "FP4 training (Transformer Engine) is not implemented; megalite trains in "
               "fp32, bf16 or fp16"),
    ("--mamba-", "hybrid (Mamba) models are not implemented"),
    ("--mtp-", "multi-token prediction is not implemented"),
    ("--dsa-", "sparse attention variants are not implemented"),
    ("--linear-", "linear attention variants are not implemented"),
    ("--fim-", "fill-in-the-middle data is not implemented"),
    ("--muon-", "megalite's optimizer is AdamW"),
    ("--rl-", "reinforcement learning is not implemented"),
    ("--inference-", "inference serving is not part of megalite train (see megalite "
                     "generate)"),
    ("--kitchen-", "quantized kernels are not implemented"),
    ("--heterogeneous-", "heterogeneous layer configurations are not implemented"),
    ("--cuda-graph-", "megalite does not capture CUDA graphs"),
    ("--straggler-", "straggler detection is not implemented"),
    ("--one-logger", "the one-logger service is not used"),
    ("--inprocess-", "in-process restart is not implemented; megalite requeues the job"),
    ("--ft-", "the fault-tolerance package is not used; megalite requeues the job"),
    ("--rerun-", "megalite has no rerun state machine"),
    ("--retro-", "retrieval models are not implemented"),
    ("--vision-", "vision models are not implemented"),
    ("--q-lora-rank", "multi-latent attention is not implemented"),
    ("--kv-lora-rank", "multi-latent attention is not implemented"),
]

BY_FLAG: dict[str, MegatronFlag] = {f: m for _, group in GROUPS for m in group for f in m.flags}


def _message(m: MegatronFlag, flag: str, values) -> str:
    if m.kind == COND:
        return (f"{flag} {' '.join(values)}: {m.text} (accepted: {flag} "
                f"{' or '.join(m.ok)})")
    return f"{flag}: {m.text}"


class _Action(argparse.Action):
    """Records a notice, or raises the refusal, for the Megatron-LM flag it stands for."""

    def __init__(self, option_strings, dest, megatron: MegatronFlag = None, **kwargs):
        self.megatron = megatron
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        m = self.megatron
        values = [] if values is None else [values] if isinstance(values, str) else list(values)
        if m.kind == REFUSE or (m.kind == COND and
                                not all(_same_value(v, m.ok) for v in values)):
            raise ConfigError(f"{_message(m, option_string, values)} (a Megatron-LM flag "
                              "megalite refuses; see megalite train --help)")
        if m.kind == NOTICE:
            notices = getattr(namespace, "_notices", None) or []
            notices.append(f"notice: {option_string} is ignored: {m.text}")
            setattr(namespace, "_notices", notices)


def _same_value(value: str, ok: tuple[str, ...]) -> bool:
    if value in ok:
        return True
    try:   # numbers written another way (1.00, 1e0)
        return any(float(value) == float(o) for o in ok)
    except ValueError:
        return False


_HEADINGS = {SAME: "same result", NOTICE: "ignored with a notice", COND: "refused unless",
             REFUSE: "refused"}


def add_megatron_flags(parser: argparse.ArgumentParser, known: set[str]) -> None:
    """Add every flag of :data:`GROUPS` that megalite does not implement itself (``known``: the
    flags already in ``parser``) to ``parser``, one argument group per Megatron-LM group."""
    for title, flags in GROUPS:
        group = parser.add_argument_group(
            f"Megatron-LM flags, {title} (not implemented as such; what megalite does)")
        for m in flags:
            if known.intersection(m.flags):
                raise ValueError(f"{m.flags[0]} is both implemented and in megatron_flags")
            what = (f"refused unless {' or '.join(m.ok)}: {m.text}" if m.kind == COND else
                    f"{_HEADINGS[m.kind]}: {m.text}")
            kwargs = dict(nargs=m.nargs) if m.nargs != 0 else dict(nargs=0)
            if m.nargs != 0:
                kwargs["metavar"] = "X"
            group.add_argument(*m.flags, action=_Action, megatron=m, dest="_megatron_flag",
                               help=what.replace("%", "%%"), **kwargs)


def refuse_families(argv: list[str], known: set[str]) -> None:
    """ConfigError for the first flag of ``argv``, in order, that is refused outright: one of
    :data:`GROUPS` of kind REFUSE, or one of a refused family (:data:`FAMILIES`) that megalite
    does not know. (Run before argparse, so that the first refused flag is the one named.)"""
    for token in argv:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        m = BY_FLAG.get(flag)
        if m is not None and m.kind == REFUSE:
            raise ConfigError(f"{_message(m, flag, [])} (a Megatron-LM flag megalite refuses; "
                              "see megalite train --help)")
        if flag in known:
            continue
        for prefix, reason in FAMILIES:
            if flag.startswith(prefix):
                raise ConfigError(f"{flag}: {reason} (a Megatron-LM flag megalite refuses; "
                                  "see megalite train --help)")


def families_help() -> str:
    """One paragraph naming the refused families, for ``--help``."""
    return ("Refused Megatron-LM flag families: " + "; ".join(
        f"{prefix}* ({reason})" for prefix, reason in FAMILIES) + ".")


__all__ = ["GROUPS", "FAMILIES", "BY_FLAG", "MegatronFlag", "SAME", "NOTICE", "REFUSE", "COND",
           "add_megatron_flags", "refuse_families", "families_help"]
