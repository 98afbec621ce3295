"""Megatron-LM flags that stand for other settings, turned into megalite's fields by the run
preparation (:mod:`megalite.training.prepare`), with Megatron-LM's rules about which flags go
together:

* ``--data-args-path FILE`` -> ``data.data_path`` (the file's white-space separated words);
  ``--per-split-data-args-path FILE.json`` -> ``data.{train,valid,test}_data_path``;
* ``--use-distributed-optimizer`` -> ``parallel.zero_stage = 1`` (Megatron-LM's distributed
  optimizer shards the optimizer state and fp32 master weights over the data-parallel ranks,
  which is ZeRO stage 1);
* ``--decoder-first/last-pipeline-num-layers`` -> ``parallel.pipeline_layer_split``;
  ``--num-virtual-stages-per-pipeline-rank`` -> ``parallel.num_layers_per_virtual_pipeline_stage``;
* ``--recompute-method`` / ``--recompute-num-layers``: checked as Megatron-LM checks them, then
  a notice (megalite's full recompute is per layer, which gives the same numbers);
* ``--train-iters`` / ``--train-samples``: one of them (iteration- or sample-based training).
"""
from __future__ import annotations

import json

from megalite.errors import ConfigError


def _read_words(path: str, flag: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            words = f.read().split()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror})", "data",
                          "data_path") from None
    if not words:
        raise ConfigError(f"{flag} {path}: the file is empty (expected [WEIGHT] PREFIX ...)",
                          "data", "data_path")
    return words


def _per_split_file(path: str) -> dict[str, list[str] | None]:
    flag = "--per-split-data-args-path"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"{flag} {path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not set(doc) <= {"train", "valid", "test"}:
        raise ConfigError(f"{flag} {path}: expected a JSON object with the keys train, valid "
                          "and test")
    out = {}
    for split in ("train", "valid", "test"):
        value = doc.get(split)
        if isinstance(value, str):
            value = value.split()
        if value is not None and (not isinstance(value, list) or
                                  not all(isinstance(v, (str, int, float)) for v in value)):
            raise ConfigError(f"{flag} {path}: {split} must be a list or a string of weights "
                              f"and prefixes, got {value!r}")
        out[f"{split}_data_path"] = [str(v) for v in value] if value else None
    return out


# Settings that say the same thing two ways: (section, a, b, default of each). Both given as
# flags (or both in the YAML file) is an error; a flag overrides the other one from the YAML.
_ALTERNATIVES = [("training", "train_iters", "train_samples", 100, None),
                 ("optim", "lr_warmup_fraction", "lr_warmup_iters", None, 0),
                 ("optim", "lr_warmup_fraction", "lr_warmup_samples", None, 0),
                 ("optim", "lr_warmup_iters", "lr_warmup_samples", 0, 0),
                 ("optim", "lr_decay_iters", "lr_decay_samples", None, None)]


def _alternatives(args, out: dict) -> None:
    for section, a, b, default_a, default_b in _ALTERNATIVES:
        flags, yaml = args.flags[section], args.yaml.get(section, {})
        if (a in flags and b in flags) or (a in yaml and b in yaml and a not in flags
                                           and b not in flags):
            raise ConfigError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} are "
                              "exclusive (Megatron-LM takes one of them)", section, b)
        if a in flags and b in yaml:
            out.setdefault(section, {})[b] = default_b
        elif b in flags and a in yaml:
            out.setdefault(section, {})[a] = default_a


def section_overrides(args) -> dict[str, dict]:
    """{section: {field: value}} that the Megatron-LM flags of ``args`` (a
    :class:`~megalite.train_args.TrainArgs`) stand for; ConfigError for flags that Megatron-LM
    does not allow together."""
    sp, out = args.specials, {"data": {}, "parallel": {}}
    _alternatives(args, out)
    if sp.get("_data_args_path"):
        if args.given("data", "data_path"):
            raise ConfigError("--data-args-path and --data-path are exclusive (the file holds "
                              "the --data-path value)", "data", "data_path")
        out["data"]["data_path"] = _read_words(sp["_data_args_path"], "--data-args-path")
    per_split = ("train_data_path", "valid_data_path", "test_data_path")
    if sp.get("_per_split_data_args_path"):
        given = [n for n in per_split if args.given("data", n)]
        if given:
            raise ConfigError(f"--per-split-data-args-path and --{given[0].replace('_', '-')} "
                              "are exclusive (the file holds the per-split paths)", "data",
                              given[0])
        out["data"].update(_per_split_file(sp["_per_split_data_args_path"]))
    if args.given("data", "split") and (
            out["data"].get("train_data_path") or out["data"].get("valid_data_path")
            or out["data"].get("test_data_path")
            or any(args.given("data", n) for n in per_split)):
        raise ConfigError("--split does not apply to --train-data-path/--valid-data-path/"
                          "--test-data-path (each split uses its files whole)", "data", "split")
    if sp.get("_distributed_optimizer"):
        stage = args.value("parallel", "zero_stage")
        if stage not in (None, 1):
            raise ConfigError(f"--use-distributed-optimizer (ZeRO stage 1) contradicts "
                              f"--zero-stage {stage}", "parallel", "zero_stage")
        out["parallel"]["zero_stage"] = 1
    return out


def parallel_overrides(args, parallel: dict, model: dict) -> dict:
    """The parallel fields that --decoder-first/last-pipeline-num-layers and
    --num-virtual-stages-per-pipeline-rank stand for (``parallel``/``model``: the merged values
    so far)."""
    sp, out = args.specials, {}
    first, last = sp.get("_first_stage_layers"), sp.get("_last_stage_layers")
    layers, pp = model.get("num_layers"), int(parallel.get("pipeline_model_parallel_size", 1))
    if first is not None or last is not None:
        if parallel.get("pipeline_layer_split") is not None:
            raise ConfigError("--decoder-first/last-pipeline-num-layers and "
                              "--pipeline-layer-split are exclusive", "parallel",
                              "pipeline_layer_split")
        out["pipeline_layer_split"] = uneven_split(layers, pp, first, last)
    virtual = sp.get("_virtual_stages")
    if virtual is not None:
        if parallel.get("num_layers_per_virtual_pipeline_stage") is not None:
            raise ConfigError("--num-virtual-stages-per-pipeline-rank and "
                              "--num-layers-per-virtual-pipeline-stage are exclusive",
                              "parallel", "num_layers_per_virtual_pipeline_stage")
        if virtual < 1 or layers is None or layers % (pp * virtual):
            raise ConfigError(f"--num-virtual-stages-per-pipeline-rank {virtual}: --num-layers "
                              f"{layers} is not a multiple of --pipeline-model-parallel-size "
                              f"{pp} x {virtual}", "parallel",
                              "num_layers_per_virtual_pipeline_stage")
        if virtual > 1:
            out["num_layers_per_virtual_pipeline_stage"] = layers // (pp * virtual)
    return out


def uneven_split(layers: int | None, pp: int, first: int | None, last: int | None) -> list[int]:
    """Layers per stage with ``first`` on the first stage and/or ``last`` on the last, the
    rest split evenly over the other stages (Megatron-LM's rule); ConfigError if it does not
    divide."""
    flag = "--decoder-first/last-pipeline-num-layers"
    if layers is None or pp < 2:
        raise ConfigError(f"{flag} need --num-layers and --pipeline-model-parallel-size >= 2",
                          "parallel", "pipeline_layer_split")
    fixed = [n for n in (first, last) if n is not None]
    middle_stages = pp - len(fixed)
    rest = layers - sum(fixed)
    if any(n < 1 for n in fixed) or rest < 0 or (middle_stages and rest % middle_stages) or (
            not middle_stages and rest):
        raise ConfigError(f"{flag}: {layers} layers do not split as first {first}, last "
                          f"{last} and the rest evenly over {middle_stages} other stage(s)",
                          "parallel", "pipeline_layer_split")
    even = rest // middle_stages if middle_stages else 0
    split = [even] * pp
    if first is not None:
        split[0] = first
    if last is not None:
        split[-1] = last
    return split


def check_recompute(args, config) -> None:
    """Megatron-LM's rules for --recompute-method/--recompute-num-layers, then a notice in
    ``args.notices`` saying what megalite does (it recomputes every layer on its own)."""
    method, num = args.specials.get("_recompute_method"), args.specials.get(
        "_recompute_num_layers")
    if method is None and num is None:
        return
    granularity = config.model.recompute_granularity
    if granularity != "full":
        raise ConfigError(f"--recompute-method/--recompute-num-layers need "
                          f"--recompute-granularity full (got {granularity})", "model",
                          "recompute_granularity")
    if method is None or num is None:
        raise ConfigError("--recompute-method and --recompute-num-layers go together",
                          "model", "recompute_granularity")
    par = config.parallel
    per_stage = config.model.num_layers // (par.pipeline_model_parallel_size
                                            * par.virtual_pipeline_size(config.model.num_layers))
    if not 1 <= num <= per_stage:
        raise ConfigError(f"--recompute-num-layers {num}: must be between 1 and the layers "
                          f"of a model chunk ({per_stage})", "model", "recompute_granularity")
    if method == "uniform" and num > 1:
        args.notices.append(f"notice: --recompute-method uniform --recompute-num-layers {num}: "
                            "megalite recomputes every layer on its own, keeping one layer "
                            f"input per layer instead of one per {num} layers (the same "
                            "numbers, more memory)")
    elif method == "block" and num < per_stage:
        args.notices.append(f"notice: --recompute-method block --recompute-num-layers {num}: "
                            f"megalite recomputes all {per_stage} layers of each model chunk, "
                            f"not only the first {num} (the same numbers, less memory, more "
                            "computation)")



def overlap_notice(args, config) -> None:
    """A notice in ``args.notices`` when ``--overlap-grad-reduce`` cannot act: under ZeRO
    DeepSpeed reduces the gradients, once per step after megalite's own sums."""
    par = config.parallel
    if par.overlap_grad_reduce and (par.zero_stage or par.deepspeed_config):
        args.notices.append("notice: --overlap-grad-reduce is ignored with ZeRO: DeepSpeed "
                            "reduce-scatters the gradients after the backward pass")


__all__ = ["section_overrides", "parallel_overrides", "uneven_split", "check_recompute",
           "overlap_notice"]
