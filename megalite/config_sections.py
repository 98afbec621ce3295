"""The five non-model sections of a run's :class:`~megalite.config.TrainConfig`
(``parallel``, ``optim``, ``precision``, ``data``, ``training``), one dataclass each with a
docstring per field; every value is checked on construction and errors name the flag and the
YAML key. :mod:`megalite.config` assembles them (and re-exports them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megalite.config_checks import at_least, bad, check_types
from megalite.errors import ConfigError, MegaliteError

__all__ = ["LR_DECAY_STYLES", "ParallelConfig", "OptimConfig", "PrecisionConfig", "DataConfig",
           "TrainingConfig"]

LR_DECAY_STYLES = ("constant", "linear", "cosine")


# ---- the sections -------------------------------------------------------------------------------
@dataclass
class ParallelConfig:
    """How the model and the batch are split over the ranks (data-parallel size = world /
    (tp*cp*pp))."""

    tensor_model_parallel_size: int = 1
    """Ranks each layer's weights are split over (heads, MLP width, vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages the layers are split over."""
    expert_model_parallel_size: int = 1
    """Ranks each MoE layer's experts are split over, carved out of the data-parallel ranks
    (must divide the data-parallel size and --num-experts)."""
    context_parallel_size: int = 1
    """Ranks each sequence is split over (load-balanced chunks, ring attention; GPT only):
    activation memory per rank falls as 1/cp (megalite.parallel.context_parallel)."""
    sequence_parallel: bool = False
    """Split norms/dropout activations along the sequence over the TP ranks (the model's
    TransformerConfig.sequence_parallel is derived from this field)."""
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
    distributed_timeout_minutes: float = 30.0
    """Timeout of the torch.distributed process groups (collectives that wait longer fail)."""
    overlap_grad_reduce: bool = False
    """All-reduce each data-parallel gradient bucket from a backward hook as soon as its last
    gradient is final (Megatron-LM's --overlap-grad-reduce), instead of after the backward
    pass; the gradients are bit-identical either way (megalite.parallel.grad_buckets)."""

    def __post_init__(self) -> None:
        check_types(self, "parallel")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "context_parallel_size"):
            at_least(self, "parallel", name, 1)
        at_least(self, "parallel", "distributed_timeout_minutes", 0, strict=True)
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
    """Iterations of linear warmup from lr_warmup_init to lr."""
    lr_warmup_samples: int = 0
    """Samples of linear warmup (sample-based runs: training.train_samples)."""
    lr_warmup_fraction: float | None = None
    """Warmup over this fraction of the decay length (in samples, Megatron-LM's rule), instead
    of lr_warmup_iters / lr_warmup_samples."""
    lr_warmup_init: float = 0.0
    """Learning rate the warmup starts from."""
    lr_decay_iters: int | None = None
    """Iteration at which the decay reaches min_lr; None: training.train_iters."""
    lr_decay_samples: int | None = None
    """Sample count at which the decay reaches min_lr (sample-based runs); None:
    training.train_samples."""
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
    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, take the learning-rate schedule (lr, min_lr, warmup and decay lengths, decay
    style) saved in the checkpoint instead of this section's."""
    override_opt_param_scheduler: bool = False
    """On resume, take this section's learning-rate schedule (also megalite's default, which
    names the differences in one line)."""

    def __post_init__(self) -> None:
        check_types(self, "optim")
        for name in ("lr", "min_lr", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_init",
                     "weight_decay", "clip_grad"):
            at_least(self, "optim", name, 0)
        for name in ("lr_decay_iters", "lr_decay_samples"):
            at_least(self, "optim", name, 1, optional=True)
        f = self.lr_warmup_fraction
        if f is not None and not 0.0 <= f <= 1.0:
            bad("optim", "lr_warmup_fraction", f"must be in [0, 1], got {f!r}")
        for other in ("lr_warmup_iters", "lr_warmup_samples"):
            if f is not None and getattr(self, other):
                bad("optim", "lr_warmup_fraction", f"and --{other.replace('_', '-')} are "
                    "exclusive (one warmup length)")
        if self.lr_warmup_iters and self.lr_warmup_samples:
            bad("optim", "lr_warmup_samples", "and --lr-warmup-iters are exclusive "
                "(sample-based or iteration-based warmup)")
        if self.lr_decay_iters is not None and self.lr_decay_samples is not None:
            bad("optim", "lr_decay_samples", "and --lr-decay-iters are exclusive "
                "(sample-based or iteration-based decay)")
        if self.lr_warmup_init > self.lr:
            bad("optim", "lr_warmup_init", f"{self.lr_warmup_init} exceeds --lr {self.lr}")
        if self.use_checkpoint_opt_param_scheduler and self.override_opt_param_scheduler:
            bad("optim", "override_opt_param_scheduler", "and "
                "--use-checkpoint-opt_param-scheduler are exclusive")
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


PER_SPLIT_PATHS = ("train_data_path", "valid_data_path", "test_data_path")


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
    """vocab.txt of the BertWordPiece tokenizers, vocab.json of GPT2BPETokenizer."""
    merge_file: str | None = None
    """merges.txt of GPT2BPETokenizer."""
    train_data_path: list[str] | None = None
    """Training token files used whole (optionally weighted), instead of data_path + split."""
    valid_data_path: list[str] | None = None
    """Validation token files used whole, instead of data_path + split."""
    test_data_path: list[str] | None = None
    """Test token files used whole, instead of data_path + split."""
    data_cache_path: str | None = None
    """Directory for the dataset index caches; None: next to the token files."""
    blend_rule: str = "megalite"
    """How several --data-path datasets are interleaved: "megalite" (Tijdeman's rule: every
    count within one sample of its share after every step) or "megatron" (megatron-core's
    rule and sizes, reproducing a Megatron run's blended order exactly)."""
    mask_prob: float = 0.15
    """BERT/T5 data: the share of the tokens masked (Megatron-LM's --mask-prob)."""
    short_seq_prob: float = 0.1
    """BERT/T5 data: the share of samples given a random shorter target length (Megatron-LM's
    --short-seq-prob)."""
    vocab_extra_ids: int = 0
    """T5 data: the sentinel tokens ``<extra_id_0>`` ... appended to the WordPiece vocabulary
    (after [BOS] and [EOS]) for the masked spans (Megatron-LM's --vocab-extra-ids; its T5
    runs use 100)."""
    reset_position_ids: bool = False
    """GPT: positions restart at 0 after each end-of-document token of a packed sample
    (Megatron-LM's --reset-position-ids)."""
    reset_attention_mask: bool = False
    """GPT: a token attends only to the earlier tokens of its own document of the sample
    (Megatron-LM's --reset-attention-mask)."""
    eod_mask_loss: bool = False
    """GPT: no loss where the input token is the end-of-document token, i.e. on predicting
    the next document's first token (Megatron-LM's --eod-mask-loss)."""

    def __post_init__(self) -> None:
        from megalite.data.blended import BLEND_RULES, parse_data_path
        from megalite.data.gpt_dataset import parse_split
        from megalite.data.tokenizers import TOKENIZER_TYPES

        check_types(self, "data")
        checks = [("split", lambda: parse_split(self.split))]
        checks += [(n, lambda n=n: getattr(self, n) and parse_data_path(getattr(self, n)))
                   for n in ("data_path",) + PER_SPLIT_PATHS]
        for name, check in checks:
            try:
                check()
            except MegaliteError as e:
                raise ConfigError(f"{e} ({'data.' + name})", "data", name) from None
        per_split = [n for n in PER_SPLIT_PATHS if getattr(self, n)]
        if self.mock_data and (self.data_path or per_split):
            bad("data", "mock_data", "cannot be combined with --data-path or --*-data-path")
        if self.data_path and per_split:
            bad("data", per_split[0], "and --data-path are exclusive (Megatron-LM would use "
                "--data-path and ignore the per-split paths)")
        if self.tokenizer_type is None and (self.vocab_file or self.merge_file):
            # Megatron-LM's pretrain_gpt.py defaults to GPT-2's BPE (vocab.json + merges.txt)
            self.tokenizer_type = "GPT2BPETokenizer"
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            bad("data", "tokenizer_type", f"must be one of {', '.join(TOKENIZER_TYPES)}, "
                f"got {self.tokenizer_type!r}")
        if self.blend_rule not in BLEND_RULES:
            bad("data", "blend_rule", f"must be one of {', '.join(BLEND_RULES)}, got "
                f"{self.blend_rule!r}")
        if not 0 < self.mask_prob < 1:
            bad("data", "mask_prob", f"must lie in (0, 1), got {self.mask_prob}")
        if not 0 <= self.short_seq_prob <= 1:
            bad("data", "short_seq_prob", f"must lie in [0, 1], got {self.short_seq_prob}")
        if isinstance(self.vocab_extra_ids, bool) or not isinstance(self.vocab_extra_ids, int) \
                or self.vocab_extra_ids < 0:
            bad("data", "vocab_extra_ids", f"must be an integer >= 0, got "
                f"{self.vocab_extra_ids!r}")
        if self.tokenizer_type is None and self.tokenizer_model:
            bad("data", "tokenizer_type", "--tokenizer-model needs --tokenizer-type")

    def per_split_paths(self) -> list[list[str] | None]:
        """The train, valid and test paths of per-split data (None where not given)."""
        return [getattr(self, n) for n in PER_SPLIT_PATHS]


@dataclass
class TrainingConfig:
    """Batches, iterations, evaluation, logging and checkpoints."""

    micro_batch_size: int = 1
    """Sequences per microbatch on one data-parallel rank."""
    global_batch_size: int | None = None
    """Sequences per iteration over all DP ranks (a multiple of micro x dp); None: micro x dp."""
    train_iters: int = 100
    """Optimizer steps to train for; with train_samples, replaced by train_samples // the
    global batch size when the run starts."""
    train_samples: int | None = None
    """Samples to train for (sample-based training, instead of train_iters): sizes the
    training data and the sample-based learning-rate schedule."""
    exit_interval: int | None = None
    """Stop (saving a checkpoint with save) after an iteration divisible by this; exit 0."""
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
    ckpt_step: int | None = None
    """With --load: the checkpoint of this iteration instead of `latest`."""
    exit_on_missing_checkpoint: bool = False
    """With --load: an error when it holds no checkpoint, instead of starting from scratch."""
    finetune: bool = False
    """With --load: load only the weights; iteration 0, fresh optimizer, schedule, data
    position and random states."""
    pretrained_checkpoint: str | None = None
    """Weights to start from (as finetune) when load holds no checkpoint or is not given."""
    no_save_optim: bool = False
    """Save checkpoints without the optimizer state (and learning-rate schedule)."""
    no_save_rng: bool = False
    """Save checkpoints without the random states."""
    save_interval: int | None = None
    """Save every this many iterations (and at the end); None: only at the end."""
    keep_last: int | None = None
    """Keep only the newest N complete checkpoints in --save; None: keep all."""
    log_json: str | None = None
    """Append one JSON object per logged iteration/evaluation to this file."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars (train/*, valid/*, test/*) here."""
    wandb_project: str | None = None
    """Log the same scalars to this Weights & Biases project (rank 0)."""
    wandb_exp_name: str | None = None
    """The W&B run name."""
    wandb_save_dir: str | None = None
    """Directory of the W&B files; None: save/wandb."""
    wandb_entity: str | None = None
    """The W&B entity (team or user)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU; None: the table of GPUs, or measured on CPU."""
    exit_duration_in_mins: float | None = None
    """Save and stop after this many minutes of training."""
    compile: bool = False
    """torch.compile each transformer layer, the final norm and the loss (GPT; inductor fuses
    the norms, rotary embedding, gated activation and residual adds); compile time is logged
    once, after the first iteration (megalite.training.compile)."""

    def __post_init__(self) -> None:
        check_types(self, "training")
        for name in ("micro_batch_size", "train_iters", "log_interval", "eval_interval"):
            at_least(self, "training", name, 1)
        if not 0 <= self.seed < 2**32:   # the data shuffles use numpy's RandomState(seed)
            bad("training", "seed", f"must be in [0, 2^32 - 1], got {self.seed}")
        at_least(self, "training", "eval_iters", 0)
        for name in ("global_batch_size", "save_interval", "keep_last", "train_samples",
                     "exit_interval"):
            at_least(self, "training", name, 1, optional=True)
        at_least(self, "training", "ckpt_step", 0, optional=True)
        for name in ("peak_tflops", "exit_duration_in_mins"):
            at_least(self, "training", name, 0, strict=True, optional=True)
        g, m = self.global_batch_size, self.micro_batch_size
        if g is not None and g % m:
            bad("training", "global_batch_size", f"{g} is not a multiple of "
                f"--micro-batch-size {m}")
        if self.save_interval is not None and not self.save:
            bad("training", "save_interval", "needs --save DIR")
        for name in ("ckpt_step", "exit_on_missing_checkpoint", "finetune"):
            if getattr(self, name) not in (None, False) and not self.load:
                bad("training", name, "needs --load DIR")
        for name in ("wandb_exp_name", "wandb_save_dir", "wandb_entity"):
            if getattr(self, name) is not None and not self.wandb_project:
                bad("training", name, "needs --wandb-project")
        if self.wandb_project and not (self.wandb_save_dir or self.save):
            bad("training", "wandb_project", "needs --wandb-save-dir or --save (W&B writes "
                "into SAVE/wandb by default)")

