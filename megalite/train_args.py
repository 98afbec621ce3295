"""``megalite train``'s command line: the flags (Megatron-LM names), the ``--config`` YAML file,
parsed once into :class:`TrainArgs`. Turning them into a checked ``TrainConfig`` (tokenizer,
checkpoint, files) is the run preparation, :mod:`megalite.training.prepare`.

Precedence, lowest first: the dataclass defaults (megalite.config), the model section and
tokenizer of the checkpoint ``--load`` resumes (if it holds one), the model preset
(``--model-preset`` or YAML ``model.preset``), the YAML file, the flags. Every value, from YAML
or a flag, goes through the same checks (megalite.config); errors name the flag, the YAML key
and, for a value from the file, the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from megalite.config import SECTION_TYPES, SECTIONS, check_keys
from megalite.errors import ConfigError, MegaliteError
from megalite.megatron_flags import add_megatron_flags, families_help, refuse_families
from megalite.model.presets import get_preset
from megalite.train_flags import OPTIONS


class _Formatter(argparse.HelpFormatter):
    """Help lines wrapped between words only: a flag name is never cut at its hyphens."""

    def _split_lines(self, text, width):
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are MegaliteErrors (one line, exit 2 from the CLI)."""

    def error(self, message):
        raise ConfigError(f"{message} (see megalite train --help)")


def _default_text(section: str, name: str) -> str:
    if section == "model":
        return ""
    f = {f.name: f for f in dataclasses.fields(SECTION_TYPES[section])}.get(name)
    if f is None or f.default is None or f.default is False or f.default is dataclasses.MISSING:
        return ""
    return f" [default: {f.default}]"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``megalite train`` (flag values only; defaults are SUPPRESSed
    so a flag overrides the YAML only when given)."""
    p = _Parser(prog="megalite train", argument_default=argparse.SUPPRESS,
                formatter_class=_Formatter,
                description="Pretrain a GPT (classic or LLaMA recipe) or another model family "
                "(--model-type) with tensor, pipeline and data parallelism. Settings come from "
                "--config FILE.yaml (sections model, parallel, optim, precision, data, training "
                "holding the field names of megalite.config, plus model.preset), overridden by "
                "the flags below.",
                epilog="Example: megalite train --config tiny-gpt --mock-data "
                "--train-iters 20; several processes: torchrun --nproc-per-node 4 -m megalite "
                "train --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 ... "
                + families_help(), allow_abbrev=False)   # Megatron-LM's parser: no abbreviations
    p.add_argument("--config", dest="_config", metavar="FILE.yaml|NAME",
                   help="YAML file with the settings, or the name of a packaged one ("
                   + ", ".join(packaged_config_names()) + "); flags override it")
    for title, section, options in OPTIONS:
        group = p.add_argument_group(title)
        for flags, name, kwargs, help_text in options:
            flags = (flags,) if isinstance(flags, str) else flags
            name = name or flags[0][2:].replace("-", "_")
            dest = name if name.startswith("_") else f"{section}.{name}"
            if "metavar" not in kwargs and "choices" not in kwargs and "action" not in kwargs:
                kwargs = {**kwargs, "metavar": {int: "N", float: "X"}.get(kwargs.get("type"),
                                                                        name.upper())}
            group.add_argument(*flags, dest=dest, help=help_text + _default_text(section, name),
                               **kwargs)
    add_megatron_flags(p, set(p._option_string_actions))
    return p


PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_config_names() -> list[str]:
    """Names of the YAML presets shipped in megalite/configs (``tiny-gpt``, ``llama2-7b``...)."""
    return sorted(n[:-5] for n in os.listdir(PACKAGED_CONFIGS) if n.endswith(".yaml"))


def resolve_config_path(name: str) -> str:
    """``--config`` value -> a file: an existing path as given, else a packaged preset by name
    (``tiny-gpt`` or ``tiny-gpt.yaml``), so the presets work from any directory."""
    if os.path.exists(name) or os.sep in name:
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    packaged = os.path.join(PACKAGED_CONFIGS, stem + ".yaml")
    if os.path.isfile(packaged):
        return packaged
    raise ConfigError(f"--config {name}: no such file, and no packaged config of that name "
                      f"(packaged: {', '.join(packaged_config_names())})")


def load_yaml(path: str) -> dict[str, dict]:
    """{section: {key: value}} of a YAML config (a path, or the name of a packaged config);
    ConfigError naming the file for bad YAML, an unknown section or key."""
    import yaml

    path = resolve_config_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}:{where} not valid YAML "
                          f"({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(doc).__name__}")
    out = {}
    for section, values in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"--config {path}: unknown section {section!r} (expected "
                              f"{', '.join(SECTIONS)})")
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: section {section} must be a mapping of keys, "
                              f"got {values!r}")
        check_keys(values, section, f"--config {path}",
                   extra=("preset",) if section == "model" else ())
        out[section] = dict(values)
    if "sequence_parallel" in out.get("model", {}):
        raise ConfigError(f"--config {path}: model.sequence_parallel is derived; set "
                          "parallel.sequence_parallel instead", "model", "sequence_parallel")
    return out


def merge_model_values(flags: dict, specials: dict, ym: dict,
                       saved: dict) -> tuple[dict, bool]:
    """Merged TransformerConfig field values (the --load checkpoint's < preset < YAML < flags) and
    whether the vocabulary size was given explicitly (a checkpoint's counts as explicit)."""
    preset = specials.get("_preset") or ym.pop("preset", None)
    ym.pop("preset", None)
    base = dict(saved)
    if preset is not None:
        try:
            base.update(dataclasses.asdict(get_preset(str(preset))))
        except MegaliteError as e:
            raise ConfigError(f"--model-preset (model.preset): {e}", "model", "preset") from None
        del base["sequence_parallel"]
    fm = dict(flags)
    for special, activation in (("_swiglu", "swiglu"), ("_openai_gelu", "gelu_tanh")):
        if specials.get(special):
            if fm.get("activation", activation) != activation:
                raise ConfigError(f"--{special[1:].replace('_', '-')} contradicts --activation "
                                  f"{fm['activation']}", "model", "activation")
            fm["activation"] = activation
    if specials.get("_recompute_activations"):   # Megatron-LM: selective recompute
        if fm.get("recompute_granularity", "selective") != "selective":
            raise ConfigError("--recompute-activations (selective) contradicts "
                              f"--recompute-granularity {fm['recompute_granularity']}",
                              "model", "recompute_granularity")
        fm["recompute_granularity"] = "selective"
    if specials.get("_rope_interpolation") is not None:   # positions / f = frequencies / f
        if specials.get("_rope_scaling") or "rope_scaling_factor" in fm:
            raise ConfigError("--rotary-seq-len-interpolation-factor contradicts "
                              "--use-rope-scaling/--rope-scaling-factor", "model",
                              "rope_scaling")
        fm.update(rope_scaling="linear", rope_scaling_factor=specials["_rope_interpolation"])
    if specials.get("_no_bias"):
        fm["add_bias_linear"] = False
    if specials.get("_rope_scaling"):
        if ym.get("rope_scaling") not in (None, "llama3"):
            raise ConfigError(f"--use-rope-scaling (llama3) contradicts model.rope_scaling: "
                              f"{ym['rope_scaling']}", "model", "rope_scaling")
        fm["rope_scaling"] = "llama3"
    # Megatron's rule (--num-query-groups only counts with --group-query-attention), unless the
    # YAML file or the preset already has grouped-query attention: then the flag resizes it.
    gqa_before = {**base, **ym}.get("num_query_groups") is not None
    if "num_query_groups" in fm and not specials.get("_gqa") and not gqa_before:
        raise ConfigError("--num-query-groups needs --group-query-attention", "model",
                          "num_query_groups")
    values = {**base, **ym, **fm}
    if "vocab_size" in saved and "vocab_size" not in ym and "vocab_size" not in fm:
        # the checkpoint's vocabulary (its tokenizer's) is the model's, whatever a preset says
        values["vocab_size"] = saved["vocab_size"]
    if specials.get("_gqa") and values.get("num_query_groups") is None:
        raise ConfigError("--group-query-attention needs --num-query-groups N", "model",
                          "num_query_groups")
    if "rope_scaling_factor" in fm and values.get("rope_scaling") is None:
        raise ConfigError("--rope-scaling-factor needs --use-rope-scaling (or model.rope_scaling "
                          "in the YAML file)", "model", "rope_scaling_factor")
    if values.get("max_position_embeddings") is None and values.get("seq_length") is not None:
        values["max_position_embeddings"] = values["seq_length"]
    return values, "vocab_size" in ym or "vocab_size" in fm or "vocab_size" in saved


@dataclass
class TrainArgs:
    """``megalite train``'s command line, parsed: the YAML file read, flags split by section.
    Nothing is checked against other files yet (that is :mod:`megalite.training.prepare`)."""

    flags: dict[str, dict]
    """{section: {field: value}} of the flags given (a flag absent here was not given)."""
    yaml: dict[str, dict]
    """{section: {key: value}} of the ``--config`` file ({} without one)."""
    config_path: str | None = None
    """The ``--config`` file (a packaged config's name resolved to its path)."""
    specials: dict = field(default_factory=dict)
    """Flags that are not one field: --model-preset, --swiglu, --group-query-attention, ..."""
    dry_run: bool = False
    """--dry-run: check and print the plan, do not train."""
    world_size: int | None = None
    """--world-size: the planned world size of a dry run."""
    notices: list[str] = field(default_factory=list)
    """One line per accepted Megatron-LM flag that megalite handles its own way
    (:mod:`megalite.megatron_flags`), for rank 0 to print."""

    def given(self, section: str, name: str) -> bool:
        """Whether a flag or the YAML file sets ``section.name``."""
        return name in self.flags[section] or name in self.yaml.get(section, {})

    def value(self, section: str, name: str, default=None):
        """A setting as the flags and the YAML file give it (flag first)."""
        return self.flags[section].get(name, self.yaml.get(section, {}).get(name, default))

    def locate(self, e: ConfigError) -> ConfigError:
        """``e`` prefixed with the --config file when one of its settings came from it."""
        if self.config_path and e.section and any(
                n in self.yaml.get(e.section, {}) and n not in self.flags[e.section]
                for n in e.names):
            return ConfigError(f"--config {self.config_path}: {e}", e.section, e.name, e.names)
        return e


def parse_args(argv=None) -> TrainArgs:
    """``megalite train`` argv -> :class:`TrainArgs` (argparse and YAML errors are ConfigErrors
    naming the flag, or the file and key)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    refuse_families(argv, set(parser._option_string_actions))
    args = vars(parser.parse_args(argv))
    notices = args.pop("_notices", [])
    args.pop("_megatron_flag", None)
    path = args.pop("_config", None)
    path = resolve_config_path(path) if path else None
    flags: dict[str, dict] = {s: {} for s in SECTIONS}
    specials = {}
    for dest, value in args.items():
        if dest.startswith("_"):
            specials[dest] = value
        else:
            section, name = dest.split(".", 1)
            flags[section][name] = value
    return TrainArgs(flags=flags, yaml=load_yaml(path) if path else {}, config_path=path,
                     specials=specials, dry_run=bool(specials.pop("_dry_run", False)),
                     world_size=specials.pop("_world_size", None), notices=notices)


__all__ = ["TrainArgs", "build_parser", "load_yaml", "merge_model_values", "parse_args",
           "packaged_config_names", "resolve_config_path"]
