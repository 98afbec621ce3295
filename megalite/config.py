"""Typed configuration of a pretraining run: ``TrainConfig`` and its sections.

A run is described by six sections, each a dataclass with a docstring per field:

=============  ==========================  ===================================================
section        class                       holds
=============  ==========================  ===================================================
``model``      :class:`TransformerConfig`          shapes and recipe (megalite.model.config)
``parallel``   :class:`ParallelConfig`     TP / PP / virtual PP / sequence parallel / ZeRO
``optim``      :class:`OptimConfig`        AdamW, weight decay, clipping, learning-rate schedule
``precision``  :class:`PrecisionConfig`    fp32 / bf16 / fp16 and the fp16 loss scaler
``data``       :class:`DataConfig`         token files, split, tokenizer
``training``   :class:`TrainingConfig`     batch sizes, iterations, logging, checkpoints
=============  ==========================  ===================================================

The same names are the YAML keys of ``megalite train --config FILE`` (``optim: {lr: 3.0e-4}``)
and, with ``_`` spelled ``-``, mostly the command-line flags (``--lr``); see
:mod:`megalite.train_args` for the flags, :mod:`megalite.config_sections` for the
sections but the model's, and :mod:`megalite.training.prepare` for the run
preparation that turns them into a TrainConfig.

Every value is checked when a section is constructed (also from YAML or a checkpoint's
``to_dict``), and errors name the flag and the YAML key (``--lr (optim.lr): ...``).

One source of truth: sequence parallelism is ``parallel.sequence_parallel``; the model's
``TransformerConfig.sequence_parallel`` is derived from it by :class:`TrainConfig` (and not stored in
``to_dict``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from megalite.config_checks import bad, coerce, option_name
from megalite.config_sections import (LR_DECAY_STYLES, DataConfig, OptimConfig, ParallelConfig,
                                      PrecisionConfig, TrainingConfig)
from megalite.errors import ConfigError, MegaliteError
from megalite.model.config import TransformerConfig

__all__ = ["SECTIONS", "SECTION_TYPES", "ParallelConfig", "OptimConfig", "PrecisionConfig",
           "DataConfig", "TrainingConfig", "TrainConfig", "check_batch_sizes",
           "resolve_vocab_size", "build_model_config", "check_keys", "LR_DECAY_STYLES"]

SECTIONS = ("model", "parallel", "optim", "precision", "data", "training")


def check_batch_sizes(training: TrainingConfig, dp_size: int) -> int:
    """Microbatches per iteration on each DP rank: global / (micro x dp); global None means
    micro x dp (one microbatch). Raises ConfigError when it does not divide."""
    step = training.micro_batch_size * dp_size
    g = training.global_batch_size or step
    if g % step:
        bad("training", "global_batch_size", f"{g} is not a multiple of --micro-batch-size "
            f"{training.micro_batch_size} x data-parallel size {dp_size} (= world size / "
            f"(tensor x pipeline parallel size))")
    return g // step


# Keys that older megalite versions wrote into checkpoints and that no longer exist (read and
# dropped, so their checkpoints still load): data.num_workers was never used.
_RETIRED_KEYS = {("data", "num_workers")}

SECTION_TYPES = {"parallel": ParallelConfig, "optim": OptimConfig, "precision": PrecisionConfig,
                  "data": DataConfig, "training": TrainingConfig}


@dataclass
class TrainConfig:
    """Everything a pretraining run needs; stored in checkpoints as :meth:`to_dict`."""

    model: TransformerConfig
    """The model (vocabulary size already known: see resolve_vocab_size)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric precision."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data and tokenizer."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batches, iterations, logging, checkpoints."""

    def __post_init__(self) -> None:
        # The parallel section owns sequence parallelism; the model's copy follows it.
        if self.model.sequence_parallel != self.parallel.sequence_parallel:
            self.model = self.model.replace(sequence_parallel=self.parallel.sequence_parallel)
        self.validate()

    @property
    def seq_length(self) -> int:
        """Training sequence length (model.seq_length or max_position_embeddings)."""
        return self.model.training_seq_length

    @property
    def vp_size(self) -> int:
        """Model chunks per pipeline stage (1 unless interleaved)."""
        return self.parallel.virtual_pipeline_size(self.model.num_layers)

    def validate(self) -> None:
        """Checks across sections (each section checked itself on construction)."""
        par, L = self.parallel, self.model.num_layers
        pp = par.pipeline_model_parallel_size
        try:
            self.model.validate_parallel(par.tensor_model_parallel_size, self.seq_length)
        except MegaliteError as e:
            raise ConfigError(str(e), "parallel", "tensor_model_parallel_size") from None
        per = par.num_layers_per_virtual_pipeline_stage
        if per is not None and L % (pp * per):
            bad("parallel", "num_layers_per_virtual_pipeline_stage",
                f"--num-layers {L} is not a multiple of --pipeline-model-parallel-size {pp} "
                f"x {per}")
        if par.pipeline_layer_split is not None:
            if sum(par.pipeline_layer_split) != L:
                bad("parallel", "pipeline_layer_split", f"{par.pipeline_layer_split} sums to "
                    f"{sum(par.pipeline_layer_split)}, not --num-layers {L}")
        elif per is None and L % pp:
            bad("parallel", "pipeline_model_parallel_size", f"--num-layers {L} is not "
                f"divisible by {pp} (or give --pipeline-layer-split)")
        self._validate_experts()
        self._validate_schedule()

    def _validate_experts(self) -> None:
        """--expert-model-parallel-size needs MoE layers whose experts it divides (the data-
        parallel size it must also divide is only known at start-up: rank_layout checks it)."""
        ep = self.parallel.expert_model_parallel_size
        experts = getattr(self.model, "num_experts", None)
        if ep > 1 and not experts:
            bad("parallel", "expert_model_parallel_size", f"{ep} needs mixture-of-experts "
                f"layers (--num-experts)")
        if experts and experts % ep:
            bad("parallel", "expert_model_parallel_size", f"{ep} does not divide --num-experts "
                f"{experts}")
        if ep > 1 and self.parallel.zero_stage == 3:
            bad("parallel", "zero_stage", f"3 with --expert-model-parallel-size {ep} is not "
                f"supported (ZeRO-3 would partition each rank's different experts as one "
                f"parameter over the data-parallel group); use --zero-stage 1 or 2 with expert "
                f"parallelism")

    def _validate_schedule(self) -> None:
        """Iteration-based or sample-based, as Megatron-LM: the learning-rate lengths in the
        unit of --train-iters / --train-samples, the warmup within the decay."""
        o, tr = self.optim, self.training
        if tr.train_samples is None:
            for name in ("lr_decay_samples", "lr_warmup_samples"):
                if getattr(o, name):
                    bad("optim", name, "needs --train-samples (sample-based training; with "
                        "--train-iters use --" + name.replace("samples", "iters")
                        .replace("_", "-") + ")")
            warmup, decay, unit = o.lr_warmup_iters, o.lr_decay_iters or tr.train_iters, "iters"
        else:
            for name in ("lr_decay_iters", "lr_warmup_iters"):
                if getattr(o, name):
                    bad("optim", name, "does not apply to sample-based training "
                        "(--train-samples): use --" + name.replace("iters", "samples")
                        .replace("_", "-"))
            warmup, decay, unit = (o.lr_warmup_samples, o.lr_decay_samples or tr.train_samples,
                                   "samples")
        if o.lr_decay_style != "constant" and warmup > decay:
            bad("optim", f"lr_warmup_{unit}", f"{warmup} exceeds the decay length {decay} "
                f"(--lr-decay-{unit}, default --train-{unit})")

    # ---- serialization (checkpoints store this) ------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able nested dict {section: {field: value}}; from_dict(to_dict()) == self."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        del out["model"]["sequence_parallel"]  # derived from parallel.sequence_parallel
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """The inverse of to_dict; unknown sections or keys are a ConfigError naming them
        (``source`` names where the dict came from, e.g. a checkpoint file)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section {unknown[0]!r} (expected "
                              f"{', '.join(SECTIONS)})")
        if "model" not in d:
            raise ConfigError(f"{source}: the model section is missing")
        sections = {}
        try:
            for name in SECTIONS:
                values = {k: v for k, v in (d.get(name) or {}).items()
                          if (name, k) not in _RETIRED_KEYS}
                check_keys(values, name, source)
                if name == "model":
                    sp = values.pop("sequence_parallel", None)
                    par_sp = (d.get("parallel") or {}).get("sequence_parallel", False)
                    if sp is not None and sp != par_sp:
                        raise ConfigError(f"model.sequence_parallel={sp} disagrees with "
                                          f"parallel.sequence_parallel={par_sp}")
                    sections[name] = build_model_config(values)
                else:
                    sections[name] = SECTION_TYPES[name](**values)
            return cls(**sections)
        except ConfigError as e:
            if str(e).startswith(f"{source}: "):
                raise
            raise ConfigError(f"{source}: {e}", e.section, e.name) from None


def section_fields(section: str) -> list[str]:
    """The keys a YAML/dict section may hold."""
    cls = TransformerConfig if section == "model" else SECTION_TYPES[section]
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(values: dict, section: str, source: str, extra: tuple[str, ...] = ()) -> None:
    """ConfigError naming ``source`` and ``section.key`` for a key the section does not have."""
    import difflib

    known = section_fields(section) + list(extra)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {section}.{key}{hint}", section, str(key))


def build_model_config(values: dict) -> TransformerConfig:
    """TransformerConfig(**values) with types checked and errors naming flags and YAML keys."""
    hints = typing.get_type_hints(TransformerConfig)
    values = {k: coerce(v, hints[k], "model", k) for k, v in values.items()}
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
               if values.get(n) is None]
    if missing:
        raise ConfigError("the model shape is incomplete: give --model-preset NAME or "
                          + ", ".join(option_name("model", n) for n in missing), "model", missing[0])
    try:
        return TransformerConfig(**values)
    except MegaliteError as e:
        message = str(e)
        named = [n for n in hints if n + "=" in message or n + " " in message]
        where = ", ".join(option_name("model", n) for n in named)
        raise ConfigError(f"{message}" + (f" [set by {where}]" if where else ""), "model",
                          named[0] if named else None, tuple(named)) from None


def resolve_vocab_size(config: TrainConfig, vocab_size: int) -> TrainConfig:
    """A copy of ``config`` whose model has vocabulary size ``vocab_size`` (the tokenizer's).

    The run preparation already takes the tokenizer's size when a tokenizer is configured
    and no size was given explicitly; this is for TrainConfigs built by hand (tests, tools).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"resolve_vocab_size: vocab_size must be a positive integer, "
                          f"got {vocab_size!r}", "model", "vocab_size")
    return dataclasses.replace(config, model=config.model.replace(vocab_size=vocab_size))
