"""Megatron-LM's training, profiling, initialization, learning-rate, regularization,
checkpointing and mixed-precision flags that megalite does not implement as such."""
from __future__ import annotations

from megalite.megatron_flags.entry import (MegatronFlag, flag, ATTENTION, CKPT_FORMAT, COND,
                                           KERNELS, NOTICE, NO_DATALOADER, NO_PROFILER, OFFLOAD,
                                           OVERLAP, REFUSE, SAME)

GROUPS: list[tuple[str, list[MegatronFlag]]] = [
    ("training", [
        flag("--rampup-batch-size", REFUSE, "+", "megalite trains with one global batch size "
             "from the first iteration (Megatron-LM refuses the ramp-up with --train-iters too, "
             "and replaces it by --step-batch-size-schedule)"),
        flag("--step-batch-size-schedule", REFUSE, None, "megalite trains with one global batch "
             "size"),
        flag("--decrease-batch-size-if-needed", REFUSE, 0, "megalite trains with one global "
             "batch size and refuses one that micro x DP does not divide"),
        flag("--batch-size", REFUSE, None, "an old Megatron-LM flag: use --micro-batch-size"),
        flag("--checkpoint-activations", REFUSE, 0, "an old Megatron-LM flag: use "
             "--recompute-activations or --recompute-granularity"),
        flag("--iterations-to-skip", REFUSE, "+", "skipping iterations is not implemented"),
        flag("--empty-unused-memory-level", NOTICE, None, "megalite never empties the CUDA "
             "cache between iterations"),
        flag("--check-weight-hash-across-dp-replicas-interval", NOTICE, None, "not checked: "
             "megalite's data-parallel replicas start from the same weights and apply the same "
             "all-reduced gradients"),
        flag("--train-sync-interval", NOTICE, None, "megalite synchronises with the device "
             "once per iteration"),
        flag("--exit-signal-handler", SAME, 0, "megalite always saves and stops on SIGTERM "
             "and SIGUSR1 (exit status 75, for requeueing)"),
        flag("--exit-signal", NOTICE, None, "megalite saves and stops on SIGTERM and SIGUSR1, "
             "whichever comes"),
        flag("--exit-signal-handler-for-dataloader", NOTICE, 0, NO_DATALOADER),
        flag("--manual-gc", NOTICE, 0, "Python's automatic garbage collection stays on"),
        flag("--manual-gc-interval", NOTICE, None, "Python's automatic garbage collection "
             "stays on"),
        flag("--no-manual-gc-eval --disable-manual-gc-eval", NOTICE, 0, "Python's automatic "
             "garbage collection stays on"),
        flag("--no-check-for-nan-in-loss-and-grad", NOTICE, 0, "megalite always stops at a "
             "non-finite loss"),
        flag("--check-for-large-grads", NOTICE, 0, "not checked; the gradient norm is logged"),
        flag("--result-rejected-tracker-filename", NOTICE, None, "megalite has no rerun "
             "state machine"),
        flag("--disable-gloo-process-groups", NOTICE, 0, "megalite creates no extra gloo groups "
             "on GPUs"),
        flag("--tp-comm-overlap-cfg", NOTICE, None, OVERLAP),
        flag("--no-masked-softmax-fusion", NOTICE, 0, ATTENTION),
        flag("--no-bias-gelu-fusion", NOTICE, 0, KERNELS),
        flag("--no-bias-swiglu-fusion", NOTICE, 0, KERNELS),
        flag("--no-bias-dropout-fusion", NOTICE, 0, KERNELS),
        flag("--no-rope-fusion", NOTICE, 0, KERNELS),
        flag("--no-persist-layer-norm", NOTICE, 0, KERNELS),
        flag("--no-gradient-accumulation-fusion", NOTICE, 0, KERNELS),
        flag("--rope-type", COND, None, "YaRN rotary embeddings are not implemented", ["rope"]),
        flag("--use-flash-attn", NOTICE, 0, ATTENTION),
        flag("--optimizer", COND, None, "megalite's optimizer is AdamW (Megatron-LM's 'adam')",
             ["adam"]),
        flag("--optimizer-cpu-offload", REFUSE, 0, OFFLOAD),
        flag("--optimizer-offload-fraction", REFUSE, None, OFFLOAD),
        flag("--use-torch-optimizer-for-cpu-offload", REFUSE, 0, OFFLOAD),
        flag("--overlap-cpu-optimizer-d2h-h2d", REFUSE, 0, OFFLOAD),
        flag("--no-pin-cpu-grads", REFUSE, 0, OFFLOAD),
        flag("--no-pin-cpu-params", REFUSE, 0, OFFLOAD),
        flag("--dump-param-to-param-group-map", REFUSE, None, "megalite's parameter groups are "
             "fixed (weight decay on matrices, none on biases and norms)"),
        flag("--dataloader-type", COND, None, "megalite reads the shuffled samples in order, "
             "as Megatron-LM's 'single' sampler; 'cyclic' and 'external' are not implemented",
             ["single"]),
        flag("--use-mcore-models", SAME, 0, "megalite's model is the one implementation (the "
             "flag is deprecated and ignored in Megatron-LM too)"),
        flag("--use-legacy-models", REFUSE, 0, "megalite has one GPT implementation"),
        flag("--high-priority-stream-groups", NOTICE, "+", "megalite uses the default CUDA "
             "streams"),
        flag("--disable-jit-fuser", NOTICE, 0, KERNELS),
    ]),
    ("profiling", [
        flag("--profile", NOTICE, 0, NO_PROFILER),
        flag("--profile-step-start", NOTICE, None, NO_PROFILER),
        flag("--profile-step-end", NOTICE, None, NO_PROFILER),
        flag("--use-pytorch-profiler", NOTICE, 0, NO_PROFILER),
        flag("--profile-ranks", NOTICE, "+", NO_PROFILER),
        flag("--record-memory-history", NOTICE, 0, NO_PROFILER),
        flag("--memory-snapshot-path", NOTICE, None, NO_PROFILER),
        flag("--nvtx-ranges", NOTICE, 0, NO_PROFILER),
    ]),
    ("RNG and initialization", [
        flag("--te-rng-tracker", NOTICE, 0, "megalite uses its own RNG tracker (no Transformer "
             "Engine)"),
        flag("--inference-rng-tracker", NOTICE, 0, "megalite uses its own RNG tracker"),
        flag("--data-parallel-random-init", REFUSE, 0, "megalite initializes the same weights "
             "on every rank and layout (different weights per data-parallel rank are not "
             "implemented)"),
        flag("--init-method-xavier-uniform", REFUSE, 0, "megalite initializes from a normal "
             "distribution (--init-method-std)"),
    ]),
    ("learning rate and weight decay", [
        flag("--lr-wsd-decay-style", REFUSE, None, "the WSD schedule is not implemented "
             "(--lr-decay-style constant, linear or cosine)"),
        flag("--lr-wsd-decay-iters", REFUSE, None, "the WSD schedule is not implemented"),
        flag("--lr-wsd-decay-samples", REFUSE, None, "the WSD schedule is not implemented"),
        flag("--start-weight-decay", REFUSE, None, "megalite's weight decay is constant "
             "(--weight-decay)"),
        flag("--end-weight-decay", REFUSE, None, "megalite's weight decay is constant "
             "(--weight-decay)"),
        flag("--weight-decay-incr-style", COND, None, "megalite's weight decay is constant "
             "(--weight-decay)", ["constant"]),
        flag("--warmup", REFUSE, None, "an old Megatron-LM flag: use --lr-warmup-fraction, "
             "--lr-warmup-iters or --lr-warmup-samples"),
        flag("--decoupled-lr", REFUSE, None, "megalite has one learning rate for all "
             "parameters (a separate one for the embedding and output layer is not "
             "implemented)"),
        flag("--decoupled-min-lr", REFUSE, None, "megalite has one learning rate for all "
             "parameters"),
        flag("--freeze-all-layers", REFUSE, 0, "freezing layers is not implemented"),
    ]),
    ("regularization", [
        flag("--apply-wd-to-qk-layernorm", REFUSE, 0, "megalite applies no weight decay to "
             "norm weights, the query/key norms included (Megatron-LM's default)"),
        flag("--no-weight-decay-cond-type", REFUSE, None, "megalite's weight-decay groups are "
             "fixed (none on biases and norms)"),
        flag("--sgd-momentum", REFUSE, None, "megalite's optimizer is AdamW"),
    ]),
    ("checkpointing", [
        flag("--save-wgrads-interval", REFUSE, None, "saving gradients is not implemented"),
        flag("--save-dgrads-interval", REFUSE, None, "saving gradients is not implemented"),
        flag("--save-retain-interval", REFUSE, None, "use --keep-last N (megalite keeps the "
             "newest N checkpoints)"),
        flag("--load-main-params-from-ckpt", REFUSE, 0, "megalite's checkpoints keep the fp32 "
             "master weights with the optimizer state: resume without --no-load-optim"),
        flag("--non-persistent-save-interval", REFUSE, None, "non-persistent checkpoints are "
             "not implemented"),
        flag("--non-persistent-ckpt-type", REFUSE, None, "non-persistent checkpoints are not "
             "implemented"),
        flag("--non-persistent-global-ckpt-dir", REFUSE, None, "non-persistent checkpoints are "
             "not implemented"),
        flag("--non-persistent-local-ckpt-dir", REFUSE, None, "non-persistent checkpoints are "
             "not implemented"),
        flag("--non-persistent-local-ckpt-algo", REFUSE, None, "non-persistent checkpoints are "
             "not implemented"),
        flag("--use-checkpoint-args", NOTICE, 0, "megalite takes the model shape and tokenizer "
             "from the --load checkpoint unless a flag or the YAML file sets them"),
        flag("--use-mp-args-from-checkpoint-args", NOTICE, 0, "megalite loads a checkpoint "
             "under any layout; the layout comes from this run's flags"),
        flag("--no-use-tokenizer-model-from-checkpoint-args "
             "--disable-use-tokenizer-model-from-checkpoint-args", NOTICE, 0, "megalite takes "
             "the tokenizer from the checkpoint unless --tokenizer-* flags set it"),
        flag("--ckpt-format", NOTICE, None, CKPT_FORMAT),
        flag("--auto-detect-ckpt-format", NOTICE, 0, CKPT_FORMAT),
        flag("--ckpt-convert-format", REFUSE, None, "use megalite convert (to-hf, from-hf, "
             "reshard)"),
        flag("--ckpt-convert-save", REFUSE, None, "use megalite convert (to-hf, from-hf, "
             "reshard)"),
        flag("--ckpt-convert-update-legacy-dist-opt-format", REFUSE, 0, "megalite does not "
             "read Megatron-LM checkpoints"),
        flag("--no-ckpt-fully-parallel-save --disable-ckpt-fully-parallel-save", NOTICE, 0,
             CKPT_FORMAT),
        flag("--ckpt-fully-parallel-save", NOTICE, 0, CKPT_FORMAT),
        flag("--async-save", NOTICE, 0, CKPT_FORMAT),
        flag("--use-persistent-ckpt-worker", NOTICE, 0, CKPT_FORMAT),
        flag("--ckpt-fully-parallel-load", NOTICE, 0, CKPT_FORMAT),
        flag("--ckpt-assume-constant-structure", NOTICE, 0, CKPT_FORMAT),
        flag("--no-strict-fsdp-dtensor-load --disable-strict-fsdp-dtensor-load", NOTICE, 0,
             CKPT_FORMAT),
        flag("--dist-ckpt-strictness", NOTICE, None, "megalite loads every saved tensor and "
             "names a missing or unexpected one"),
        flag("--dist-ckpt-save-pre-mcore-014", NOTICE, 0, CKPT_FORMAT),
        flag("--dist-ckpt-optim-fully-reshardable", SAME, 0, "megalite's optimizer state is "
             "always reshardable (by parameter name)"),
        flag("--distrib-optim-fully-reshardable-mem-efficient", NOTICE, 0, CKPT_FORMAT),
        flag("--use-dist-ckpt", NOTICE, 0, CKPT_FORMAT),
        flag("--dist-ckpt-format", NOTICE, None, CKPT_FORMAT),
        flag("--dist-ckpt-workers", NOTICE, None, CKPT_FORMAT),
        flag("--replication", REFUSE, 0, "replicated local checkpoints are not implemented"),
        flag("--replication-jump", REFUSE, None, "replicated local checkpoints are not "
             "implemented"),
        flag("--replication-factor", REFUSE, None, "replicated local checkpoints are not "
             "implemented"),
    ]),
    ("mixed precision", [
        flag("--grad-reduce-in-bf16", REFUSE, 0, "megalite reduces gradients in fp32; "
             "reducing them in bf16 gives other numbers"),
        flag("--attention-softmax-in-fp32", NOTICE, 0, ATTENTION),
        flag("--accumulate-allreduce-grads-in-fp32", SAME, 0, "megalite's gradients are always "
             "accumulated and all-reduced in fp32"),
        flag("--fp16-lm-cross-entropy", REFUSE, 0, "megalite computes the cross entropy in "
             "fp32; in fp16 it gives other numbers"),
        flag("--reuse-grad-buf-for-mxfp8-param-ag", REFUSE, 0, "FP8 training is not "
             "implemented"),
    ]),
]
