"""Typed configuration of a pretraining run: ``TrainConfig`` and its sections.

A run is described by six sections, each a dataclass with a docstring per field:

=============  ==========================  ===================================================
section        class                       holds
=============  ==========================  ===================================================
``model``      :class:`GPTConfig`          shapes and recipe (megalite.model.config)
``parallel``   :class:`ParallelConfig`     TP / PP / virtual PP / sequence parallel / ZeRO
``optim``      :class:`OptimConfig`        AdamW, weight decay, clipping, learning-rate schedule
``precision``  :class:`PrecisionConfig`    fp32 / bf16 / fp16 and the fp16 loss scaler
``data``       :class:`DataConfig`         token files, split, tokenizer
``training``   :class:`TrainingConfig`     batch sizes, iterations, logging, checkpoints
=============  ==========================  ===================================================

The same names are the YAML keys of ``megalite train --config FILE`` (``optim: {lr: 3.0e-4}``)
and, with ``_`` spelled ``-``, mostly the command-line flags (``--lr``); see
:mod:`megalite.train_args` for the flags and :mod:`megalite.training.prepare` for the run
preparation that turns them into a TrainConfig.

Every value is checked when a section is constructed (also from YAML or a checkpoint's
``to_dict``), and errors name the flag and the YAML key (``--lr (optim.lr): ...``).

One source of truth: sequence parallelism is ``parallel.sequence_parallel``; the model's
``GPTConfig.sequence_parallel`` is derived from it by :class:`TrainConfig` (and not stored in
``to_dict``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import torch

from megalite.config_checks import at_least, bad, check_types, coerce, option_name
from megalite.errors import ConfigError, MegaliteError
from megalite.model.config import GPTConfig

__all__ = ["SECTIONS", "SECTION_TYPES", "ParallelConfig", "OptimConfig", "PrecisionConfig",
           "DataConfig", "TrainingConfig", "TrainConfig", "check_batch_sizes",
           "resolve_vocab_size", "build_model_config", "check_keys"]

SECTIONS = ("model", "parallel", "optim", "precision", "data", "training")
LR_DECAY_STYLES = ("constant", "linear", "cosine")

# ---- the sections -------------------------------------------------------------------------------
@dataclass
class ParallelConfig:
    """How the model and the batch are split over the ranks (data-parallel size = world / (tp*pp))."""

    tensor_model_parallel_size: int = 1
    """Ranks each layer's weights are split over (heads, MLP width, vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages the layers are split over."""
    sequence_parallel: bool = False
    """Split norms/dropout activations along the sequence over the TP ranks (the model's
    GPTConfig.sequence_parallel is derived from this field)."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Layers per virtual stage for interleaved 1F1B; None: one chunk per stage. The number of
    chunks per stage is num_layers / (pp * this)."""
    pipeline_layer_split: list[int] | None = None
    """Explicit layers per pipeline stage (length pp, sums to num_layers), e.g. fewer layers
    on the stages holding the embedding and output layer; None: an even split."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (megalite's own optimizer), 1, 2 or 3."""
    deepspeed_config: str | None = None
    """A user's DeepSpeed JSON config, merged with (and checked against) megalite's flags."""

    def __post_init__(self) -> None:
        check_types(self, "parallel")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            at_least(self, "parallel", name, 1)
        at_least(self, "parallel", "num_layers_per_virtual_pipeline_stage", 1, optional=True)
        if self.zero_stage not in (0, 1, 2, 3):
            bad("parallel", "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.num_layers_per_virtual_pipeline_stage is not None:
            if self.pipeline_model_parallel_size < 2:
                bad("parallel", "num_layers_per_virtual_pipeline_stage",
                    "interleaving needs --pipeline-model-parallel-size >= 2")
            if self.pipeline_layer_split is not None:
                bad("parallel", "pipeline_layer_split", "cannot be combined with "
                    "--num-layers-per-virtual-pipeline-stage (interleaving splits evenly)")
        split = self.pipeline_layer_split
        if split is not None:
            if len(split) != self.pipeline_model_parallel_size:
                bad("parallel", "pipeline_layer_split", f"{split} has {len(split)} entries, "
                    f"expected one per pipeline stage ({self.pipeline_model_parallel_size})")
            if any(n < 0 for n in split):
                bad("parallel", "pipeline_layer_split", f"layer counts must be >= 0, got {split}")

    def virtual_pipeline_size(self, num_layers: int) -> int:
        """Model chunks per pipeline stage (1 unless interleaved)."""
        per = self.num_layers_per_virtual_pipeline_stage
        return 1 if per is None else num_layers // (self.pipeline_model_parallel_size * per)


@dataclass
class OptimConfig:
    """AdamW, gradient clipping and the learning-rate schedule (megalite.optim.lr_schedule)."""

    lr: float = 3e-4
    """Peak learning rate (reached at the end of the warmup)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (and after it)."""
    lr_warmup_iters: int = 0
    """Iterations of linear warmup from 0 to lr."""
    lr_decay_iters: int | None = None
    """Iteration at which the decay reaches min_lr; None: training.train_iters."""
    lr_decay_style: str = "cosine"
    """"constant", "linear" or "cosine" decay from lr to min_lr after the warmup."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (over all ranks) to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        check_types(self, "optim")
        for name in ("lr", "min_lr", "lr_warmup_iters", "weight_decay", "clip_grad"):
            at_least(self, "optim", name, 0)
        at_least(self, "optim", "lr_decay_iters", 1, optional=True)
        at_least(self, "optim", "adam_eps", 0, strict=True)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad("optim", name, f"must be in [0, 1), got {getattr(self, name)!r}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            bad("optim", "lr_decay_style", f"must be one of {', '.join(LR_DECAY_STYLES)}, "
                f"got {self.lr_decay_style!r}")
        if self.min_lr > self.lr:
            bad("optim", "min_lr", f"{self.min_lr} exceeds --lr {self.lr}")


@dataclass
class PrecisionConfig:
    """Parameter/compute dtype; fp16's dynamic loss scaler."""

    bf16: bool = False
    """bf16 parameters and compute; fp32 master weights and gradient accumulation."""
    fp16: bool = False
    """fp16 parameters and compute with loss scaling; fp32 master weights."""
    initial_loss_scale: float = 2.0 ** 16
    """fp16: the dynamic loss scale to start from."""
    min_loss_scale: float = 1.0
    """fp16: the dynamic loss scale never drops below this."""
    loss_scale_window: int = 1000
    """fp16: iterations without overflow before the scale is doubled."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the scale is halved."""
    loss_scale: float | None = None
    """fp16: a static loss scale instead of the dynamic one; None: dynamic."""

    def __post_init__(self) -> None:
        check_types(self, "precision")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 (precision.bf16) and --fp16 (precision.fp16) are mutually "
                              "exclusive", "precision", "fp16")
        for name in ("initial_loss_scale", "min_loss_scale"):
            at_least(self, "precision", name, 0, strict=True)
        at_least(self, "precision", "loss_scale", 0, strict=True, optional=True)
        for name in ("loss_scale_window", "hysteresis"):
            at_least(self, "precision", name, 1)
        if self.min_loss_scale > self.initial_loss_scale:
            bad("precision", "min_loss_scale", f"{self.min_loss_scale} exceeds "
                f"--initial-loss-scale {self.initial_loss_scale}")
        if self.loss_scale is not None and not self.fp16:
            bad("precision", "loss_scale", "a loss scale is only used with --fp16")

    @property
    def params_dtype(self) -> torch.dtype:
        """torch.bfloat16, torch.float16 or torch.float32."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass
class DataConfig:
    """Where the tokens come from."""

    data_path: list[str] | None = None
    """Token-file prefixes (PREFIX.bin/.idx), optionally weighted: ["0.3", "a", "0.7", "b"]."""
    split: str = "969,30,1"
    """train,valid,test weights over the documents of each token file."""
    mock_data: bool = False
    """Random tokens instead of files (benchmarks, tests); needs a vocabulary size."""
    tokenizer_type: str | None = None
    """One of megalite.data.tokenizers.TOKENIZER_TYPES; sets the model's vocabulary size."""
    tokenizer_model: str | None = None
    """SentencePiece .model or tokenizer.json (HuggingFaceTokenizer)."""
    vocab_file: str | None = None
    """vocab.txt of the BertWordPiece tokenizers."""
    data_cache_path: str | None = None
    """Directory for the dataset index caches; None: next to the token files."""
    blend_rule: str = "megalite"
    """How several --data-path datasets are interleaved: "megalite" (Tijdeman's rule: every
    count within one sample of its share after every step) or "megatron" (megatron-core's
    rule and sizes, reproducing a Megatron run's blended order exactly)."""

    def __post_init__(self) -> None:
        from megalite.data.blended import BLEND_RULES, parse_data_path
        from megalite.data.gpt_dataset import parse_split
        from megalite.data.tokenizers import TOKENIZER_TYPES

        check_types(self, "data")
        for name, check in (("split", lambda: parse_split(self.split)),
                            ("data_path", lambda: self.data_path and parse_data_path(self.data_path))):
            try:
                check()
            except MegaliteError as e:
                raise ConfigError(f"{e} ({'data.' + name})", "data", name) from None
        if self.mock_data and self.data_path:
            bad("data", "mock_data", "cannot be combined with --data-path")
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            bad("data", "tokenizer_type", f"must be one of {', '.join(TOKENIZER_TYPES)}, "
                f"got {self.tokenizer_type!r}")
        if self.blend_rule not in BLEND_RULES:
            bad("data", "blend_rule", f"must be one of {', '.join(BLEND_RULES)}, got "
                f"{self.blend_rule!r}")
        if self.tokenizer_type is None and (self.tokenizer_model or self.vocab_file):
            bad("data", "tokenizer_type", "--tokenizer-model/--vocab-file need --tokenizer-type")


@dataclass
class TrainingConfig:
    """Batches, iterations, evaluation, logging and checkpoints."""

    micro_batch_size: int = 1
    """Sequences per microbatch on one data-parallel rank."""
    global_batch_size: int | None = None
    """Sequences per iteration over all DP ranks (a multiple of micro x dp); None: micro x dp."""
    train_iters: int = 100
    """Optimizer steps to train for."""
    seed: int = 1234
    """Seed of the weights, dropout and data order."""
    log_interval: int = 10
    """Log the training metrics every this many iterations."""
    eval_interval: int = 1000
    """Compute the validation loss every this many iterations."""
    eval_iters: int = 10
    """Global batches per validation/test evaluation; 0 disables evaluation."""
    save: str | None = None
    """Checkpoint directory to write; None: no checkpoints."""
    load: str | None = None
    """Checkpoint directory to resume from (its `latest`); None: start fresh."""
    no_load_optim: bool = False
    """With --load: start a fresh optimizer instead of restoring the saved optimizer state."""
    no_load_rng: bool = False
    """With --load: keep this run's seeded random states instead of the saved ones."""
    save_interval: int | None = None
    """Save every this many iterations (and at the end); None: only at the end."""
    keep_last: int | None = None
    """Keep only the newest N complete checkpoints in --save; None: keep all."""
    log_json: str | None = None
    """Append one JSON object per logged iteration/evaluation to this file."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars (train/*, valid/*, test/*) here."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU; None: the table of GPUs, or measured on CPU."""
    exit_duration_in_mins: float | None = None
    """Save and stop after this many minutes of training."""

    def __post_init__(self) -> None:
        check_types(self, "training")
        for name in ("micro_batch_size", "train_iters", "log_interval", "eval_interval"):
            at_least(self, "training", name, 1)
        if not 0 <= self.seed < 2**32:   # the data shuffles use numpy's RandomState(seed)
            bad("training", "seed", f"must be in [0, 2^32 - 1], got {self.seed}")
        at_least(self, "training", "eval_iters", 0)
        for name in ("global_batch_size", "save_interval", "keep_last"):
            at_least(self, "training", name, 1, optional=True)
        for name in ("peak_tflops", "exit_duration_in_mins"):
            at_least(self, "training", name, 0, strict=True, optional=True)
        g, m = self.global_batch_size, self.micro_batch_size
        if g is not None and g % m:
            bad("training", "global_batch_size", f"{g} is not a multiple of "
                f"--micro-batch-size {m}")
        if self.save_interval is not None and not self.save:
            bad("training", "save_interval", "needs --save DIR")


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

    model: GPTConfig
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
        o, iters = self.optim, self.training.train_iters
        decay = o.lr_decay_iters or iters
        if o.lr_decay_style != "constant" and o.lr_warmup_iters > decay:
            bad("optim", "lr_warmup_iters", f"{o.lr_warmup_iters} exceeds the decay length "
                f"{decay} (--lr-decay-iters, default --train-iters)")

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
    cls = GPTConfig if section == "model" else SECTION_TYPES[section]
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


def build_model_config(values: dict) -> GPTConfig:
    """GPTConfig(**values) with types checked and errors naming flags and YAML keys."""
    hints = typing.get_type_hints(GPTConfig)
    values = {k: coerce(v, hints[k], "model", k) for k, v in values.items()}
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
               if values.get(n) is None]
    if missing:
        raise ConfigError("the model shape is incomplete: give --model-preset NAME or "
                          + ", ".join(option_name("model", n) for n in missing), "model", missing[0])
    try:
        return GPTConfig(**values)
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
