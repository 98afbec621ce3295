"""Validation of the mixture-of-experts fields of
:class:`~megalite.model.config.TransformerConfig` and which layers are MoE layers (kept apart so
the config module stays about the dense model)."""
from __future__ import annotations

from typing import Callable

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")


def is_moe_layer(config, i: int) -> bool:
    """Layer ``i`` (0-based) is an MoE layer: ``num_experts`` set and ``moe_layer_freq`` N with
    ``i % N == 0``, or a 0/1 list with a 1 at ``i``."""
    if not config.num_experts:
        return False
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return i % freq == 0
    return bool(freq[i])


def parse_layer_freq(text: str) -> int | list[int]:
    """``--moe-layer-freq`` as Megatron-LM takes it: ``N``, a list ``[1,0,1,0]``, or a list
    expression of lists, ints, ``*`` and ``+`` such as ``([1]*3+[0])*2`` (nothing else is
    evaluated)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if not text or set(text) - set("[]()0123456789*+, "):
        raise ValueError(f"an integer or a list such as [1,0,1,0] was expected, got {text!r}")
    try:
        value = eval(text, {"__builtins__": {}}, {})  # noqa: S307 (charset checked above)
    except Exception as e:  # noqa: BLE001 (any parse error is the user's input)
        raise ValueError(f"cannot read {text!r}: {e}") from None
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise ValueError(f"a list of 0 and 1 was expected, got {text!r}")
    return [int(v) for v in value]


def validate(config, bad: Callable[[str], None]) -> None:
    """Raise (through ``bad``) when the MoE fields are inconsistent."""
    e = config.num_experts
    if e is None:
        return
    if not isinstance(e, int) or isinstance(e, bool) or e < 1:
        bad(f"num_experts must be a positive integer or None, got {e!r}")
    k = config.moe_router_topk
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= e:
        bad(f"moe_router_topk must be an integer in [1, num_experts={e}], got {k!r}")
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        v = getattr(config, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            bad(f"{name} must be a positive integer or None, got {v!r}")
    freq = config.moe_layer_freq
    if isinstance(freq, list):
        if len(freq) != config.num_layers or any(v not in (0, 1) for v in freq):
            bad(f"moe_layer_freq as a list needs one 0/1 per layer ({config.num_layers}), "
                f"got {freq!r}")
    elif not isinstance(freq, int) or isinstance(freq, bool) or freq < 1:
        bad(f"moe_layer_freq must be a positive integer or a 0/1 list, got {freq!r}")
    if config.moe_router_load_balancing_type not in LOAD_BALANCING_TYPES:
        bad(f"moe_router_load_balancing_type must be one of {LOAD_BALANCING_TYPES}, got "
            f"{config.moe_router_load_balancing_type!r}")
    if not config.moe_aux_loss_coeff >= 0:
        bad(f"moe_aux_loss_coeff must be >= 0, got {config.moe_aux_loss_coeff!r}")
    z = config.moe_z_loss_coeff
    if z is not None and not z >= 0:
        bad(f"moe_z_loss_coeff must be >= 0 or None, got {z!r}")
    c = config.moe_expert_capacity_factor
    if c is not None and not c > 0:
        bad(f"moe_expert_capacity_factor must be > 0 or None, got {c!r}")
    if config.moe_shared_expert_gate and not config.moe_shared_expert_intermediate_size:
        bad("moe_shared_expert_gate needs moe_shared_expert_intermediate_size")
    if config.add_bias_linear:
        bad("MoE layers have no biases: set add_bias_linear false (--disable-bias-linear)")
    if config.model_type != "gpt":
        bad(f"num_experts: mixture-of-experts layers are for GPT models, got model_type "
            f"{config.model_type!r}")


def validate_parallel(config, tp_size: int, bad: Callable[[str], None]) -> None:
    """The expert widths split over ``tp_size`` ranks as the dense MLP's."""
    if not config.num_experts:
        return
    if config.moe_ffn_size % tp_size:
        bad(f"moe_ffn_hidden_size={config.moe_ffn_size} is not divisible by {tp_size}")
    shared = config.moe_shared_expert_intermediate_size
    if shared and shared % tp_size:
        bad(f"moe_shared_expert_intermediate_size={shared} is not divisible by {tp_size}")
