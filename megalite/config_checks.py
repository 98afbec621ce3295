"""Checking single settings of :mod:`megalite.config`: type coercion and range checks whose
errors name the flag and the YAML key (``--lr (optim.lr): must be >= 0, got -1.0``).

Used alike for values from flags, YAML files, checkpoints' ``to_dict`` and direct construction,
so a value is accepted or refused the same way wherever it comes from.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from megalite.errors import ConfigError

# Fields whose flag is not "--" + field name with "_" -> "-".
_FLAG_EXCEPTIONS = {
    ("model", "activation"): "--swiglu/--activation",
    ("model", "add_bias_linear"): "--disable-bias-linear",
    ("model", "layernorm_epsilon"): "--norm-epsilon",
    ("model", "rope_scaling"): "--use-rope-scaling",
}


def flag_name(section: str, name: str) -> str:
    """The command-line flag that sets ``section.name`` (e.g. ``--lr`` for optim.lr)."""
    return _FLAG_EXCEPTIONS.get((section, name), "--" + name.replace("_", "-"))


def option_name(section: str, name: str) -> str:
    """How errors name a setting: its flag and its YAML key, ``--lr (optim.lr)``."""
    return f"{flag_name(section, name)} ({section}.{name})"


def bad(section: str, name: str, message: str):
    """Raise ConfigError ``"--flag (section.name): message"``."""
    raise ConfigError(f"{option_name(section, name)}: {message}", section, name)


# ---- type checking and coercion (shared by YAML, from_dict and direct construction) --------------
def coerce(value, tp, section: str, name: str):
    """``value`` converted to the annotated type ``tp`` the way the flag's parser would convert
    it (numbers written as strings, e.g. YAML's ``3e-4``, are accepted), else a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        lists = [a for a in inner if typing.get_origin(a) is list]
        if lists and isinstance(value, (list, tuple)):   # e.g. int | list[int]
            return coerce(value, lists[0], section, name)
        return coerce(value, inner[0], section, name)
    want = getattr(tp, "__name__", str(tp))
    if origin is list:
        items = value.split(",") if isinstance(value, str) and args[0] is int else value
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, (list, tuple)):
            bad(section, name, f"expected a list, got {value!r}")
        return [coerce(v, args[0], section, name) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        bad(section, name, f"expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = tp(value.strip())
            except ValueError:
                bad(section, name, f"expected {want}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad(section, name, f"expected {want}, got {value!r}")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                bad(section, name, f"expected an integer, got {value!r}")
            return int(value)
        return float(value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        bad(section, name, f"expected a string, got {value!r}")
    return value


def check_types(obj, section: str) -> None:
    """Coerce every field of dataclass ``obj`` to its annotated type, in place."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, coerce(getattr(obj, f.name), hints[f.name],
                                                section, f.name))


def at_least(obj, section: str, name: str, low: float, optional: bool = False,
              strict: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    if value is None or (value <= low if strict else value < low):
        bad(section, name, f"must be {'>' if strict else '>='} {low}, got {value!r}")
