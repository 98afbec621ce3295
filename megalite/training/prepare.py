"""The run preparation that ``megalite train`` and ``--dry-run`` share: parsed arguments ->
a checked :class:`~megalite.config.TrainConfig`, before any process group exists.

In order: the model shape and tokenizer of the checkpoint ``--load`` resumes (the lowest layer
of the settings), the sections built and checked, the tokenizer loaded for the vocabulary size,
then the checks that need the file system or other settings together: training data given,
ZeRO's limits, ``--load`` and ``--deepspeed-config`` present. Every failure is a ConfigError
naming the flag, the YAML key and, for a value from the file, the file.

The vocabulary size: ``--vocab-size`` / ``model.vocab_size`` (or the checkpoint's) if given;
else the tokenizer's (an explicit size must be at least the tokenizer's); else the preset's
(for ``--mock-data``).
"""
from __future__ import annotations

import os

from megalite.config import SECTION_TYPES, TrainConfig, build_model_config
from megalite.config_checks import option_name
from megalite.errors import ConfigError, MegaliteError
from megalite.families import family_of
from megalite.parallel.context_parallel import check_context_parallel
from megalite.training.compile import check_compile
from megalite.train_args import TrainArgs, merge_model_values, parse_args
from megalite.training.megatron_args import (check_recompute, overlap_notice,
                                             parallel_overrides, section_overrides)

# What a checkpoint's data section says about the tokenizer (its data files are not taken:
# a resumed run names its data itself).
_CHECKPOINT_DATA_KEYS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")


def checkpoint_defaults(load: str | None, iteration: int | None = None,
                        pretrained: str | None = None) -> tuple[dict, dict]:
    """(model section, tokenizer fields of the data section) of the checkpoint that ``--load``
    (at ``--ckpt-step``) would resume, else of ``--pretrained-checkpoint``, or ({}, {}) when
    there is none: so ``--load DIR`` alone knows the model's shape and tokenizer (a
    ``convert from-hf`` checkpoint, a run resumed without its YAML)."""
    from megalite.checkpoint.io import resolve_checkpoint
    from megalite.checkpoint.reshard import read_train_config

    for directory, step in ((load, iteration), (pretrained, None)):
        try:
            found = directory and os.path.isdir(directory) and \
                resolve_checkpoint(directory, step) is not None
        except MegaliteError as e:
            raise ConfigError(f"{option_name('training', 'ckpt_step')}: {e}", "training",
                              "ckpt_step") from None
        if found:
            break
    else:
        return {}, {}
    saved = read_train_config(directory, step)
    saved = saved.to_dict() if isinstance(saved, TrainConfig) else saved
    model = dict(saved.get("model") or {})
    model.pop("sequence_parallel", None)       # a layout choice, not the model's shape
    data = {k: v for k, v in (saved.get("data") or {}).items()
            if k in _CHECKPOINT_DATA_KEYS and v is not None}
    return model, data


def _family(config_values: dict):
    """The model family of the run (:mod:`megalite.families`); a ConfigError naming
    ``--model-type`` when it is unknown or not available."""
    try:
        return family_of(config_values.get("model_type") or "gpt")
    except MegaliteError as e:
        raise ConfigError(f"{e} (model.model_type)", "model", "model_type") from None


def _vocab_size(config_values: dict, explicit: bool, data, by_user: bool) -> None:
    """Set ``config_values["vocab_size"]`` from the tokenizer unless given explicitly
    (``by_user``: by a flag or the YAML file, not only by the --load checkpoint). The
    tokenizer's size is the one the model family needs (BERT: with the tokens its data
    appends)."""
    family = _family(config_values)
    if data.tokenizer_type == "NullTokenizer":
        # Megatron-LM's NullTokenizer: ids below --vocab-size, and the eod id after them (a
        # checkpoint's model size already counts it)
        if by_user:
            config_values["vocab_size"] += 1
        elif not explicit:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size N (its ids "
                              "are 0..N-1, the end-of-document id N)", "model", "vocab_size")
    elif data.tokenizer_type is not None:
        from megalite.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model,
                                    data.vocab_file, data.merge_file)
        try:
            tok_vocab = family.tokenizer_vocab_size(tokenizer, data)
        except MegaliteError as e:   # e.g. BERT data from a tokenizer that is not WordPiece
            raise ConfigError(f"--model-type {family.name}: {e}", "data",
                              "tokenizer_type") from None
        if not explicit:
            config_values["vocab_size"] = tok_vocab
        elif config_values["vocab_size"] < tok_vocab:
            raise ConfigError(f"{option_name('model', 'vocab_size')}: "
                              f"{config_values['vocab_size']} is smaller than the vocabulary "
                              f"of the tokenizer ({tok_vocab}"
                              + (f"; {family.vocab_note}" if family.vocab_note else "") + ")",
                              "model", "vocab_size")
    elif config_values.get("vocab_size") is None:
        raise ConfigError("the vocabulary size is unknown: give --vocab-size N (e.g. with "
                          "--mock-data), a --model-preset, or a tokenizer "
                          "(--tokenizer-type with --tokenizer-model/--vocab-file)",
                          "model", "vocab_size")


def _check_run(config: TrainConfig) -> None:
    """Checks of the whole run that need other files or several sections together."""
    data, par = config.data, config.parallel
    if not data.mock_data and not data.data_path and not data.train_data_path:
        raise ConfigError("no training data: give --data-path PREFIX (data.data_path), "
                          "--train-data-path PREFIX or --mock-data (data.mock_data)", "data",
                          "data_path")
    if par.zero_stage:
        # Before any process group exists (data-parallel size unknown: stage limits depend
        # on TP/PP and precision only); build_optimizer checks again with the real layout.
        from megalite.optim.zero import validate_zero

        validate_zero(par.zero_stage, (par.tensor_model_parallel_size,
                                       par.pipeline_model_parallel_size, 1), config.precision)
    load = config.training.load
    if load is not None and not os.path.isdir(load):
        # A mistyped --load must not quietly train from scratch (in a requeue loop, a silent
        # restart from iteration 0); an existing empty directory does start from scratch.
        what = "is not a directory" if os.path.exists(load) else "does not exist"
        raise ConfigError(f"{option_name('training', 'load')}: {load} {what} (to start from "
                          "scratch, create it or leave out --load)", "training", "load")
    pretrained = config.training.pretrained_checkpoint
    if pretrained is not None and not os.path.isdir(pretrained):
        raise ConfigError(f"{option_name('training', 'pretrained_checkpoint')}: {pretrained} "
                          "is not a directory", "training", "pretrained_checkpoint")
    ds = par.deepspeed_config
    if ds is not None and not os.path.isfile(ds):
        raise ConfigError(f"{option_name('parallel', 'deepspeed_config')}: {ds}: no such file",
                          "parallel", "deepspeed_config")
    check_context_parallel(config)
    check_compile(config)
    family = family_of(config.model)
    if family.check_run is not None:
        family.check_run(config)


def prepare_run(args: TrainArgs) -> TrainConfig:
    """Parsed ``megalite train`` arguments -> the checked TrainConfig of the run (its model
    has its vocabulary size). ConfigError (a MegaliteError) naming flag, YAML key and file."""
    saved_model, saved_data = checkpoint_defaults(args.value("training", "load"),
                                                  args.value("training", "ckpt_step"),
                                                  args.value("training", "pretrained_checkpoint"))
    try:
        extra = section_overrides(args)
        values = {s: {**(saved_data if s == "data" else {}), **args.yaml.get(s, {}),
                      **args.flags[s], **extra.get(s, {})} for s in SECTION_TYPES}
        model_values, explicit_vocab = merge_model_values(
            args.flags["model"], args.specials, dict(args.yaml.get("model", {})), saved_model)
        values["parallel"].update(parallel_overrides(args, values["parallel"], model_values))
        sections = {s: cls(**values[s]) for s, cls in SECTION_TYPES.items()}
        _vocab_size(model_values, explicit_vocab, sections["data"],
                    args.given("model", "vocab_size"))
        config = TrainConfig(model=build_model_config(model_values), **sections)
        check_recompute(args, config)
        overlap_notice(args, config)
        _check_run(config)
    except ConfigError as e:
        raise args.locate(e) from None
    return config


def parse_train_args(argv=None) -> TrainConfig:
    """``megalite train`` argv -> the run's TrainConfig (:func:`parse_args` then
    :func:`prepare_run`), for tests, benchmarks and tools that build a trainer."""
    return prepare_run(parse_args(argv))


__all__ = ["checkpoint_defaults", "parse_train_args", "prepare_run"]
