"""The flags of ``megalite train`` that megalite implements (Megatron-LM's names and meanings),
by argument group. :mod:`megalite.megatron_flags` lists the other Megatron-LM flags: accepted
with a notice, or refused with the reason.

Each group is ``(title, section, options)``; each option ``(flags, field, argparse kwargs,
help)``: ``flags`` is one flag or a tuple of spellings (the first is the name), ``field`` the
section's field it sets (None: the flag's name with ``-`` -> ``_``), or a name starting with
``_`` for a flag that is not one field (read by :func:`megalite.train_args.merge_model_values`
and :mod:`megalite.training.prepare`).
"""
from __future__ import annotations

from megalite.config import LR_DECAY_STYLES
from megalite.model.config import (ACTIVATIONS, MODEL_TYPES, NORMALIZATIONS,
                                   POSITION_EMBEDDING_TYPES)
from megalite.model.moe_config import parse_layer_freq
from megalite.model.presets import PRESETS

_TOKENIZERS = ("SentencePieceTokenizer, HuggingFaceTokenizer, GPT2BPETokenizer, "
               "BertWordPieceLowerCase, BertWordPieceCase or NullTokenizer")

OPTIONS = [
    ("model (start from --model-preset, then override single fields)", "model", [
        ("--model-preset", "_preset", dict(choices=PRESETS, metavar="NAME"),
         f"named model shape to start from: {', '.join(PRESETS)}"),
        ("--model-type", None, dict(choices=MODEL_TYPES),
         "the model family: gpt (decoder-only; default), bert (bidirectional encoder, "
         "masked-LM and sentence-order heads), t5 (encoder-decoder)"),
        ("--bert-no-binary-head", "bert_binary_head", dict(action="store_false"),
         "BERT: no binary (sentence-order) head and no token types; the samples are not cut "
         "into two segments"),
        ("--norm-placement", None, dict(choices=("pre", "post")),
         "BERT and T5 families: the norms before each sublayer (pre: Megatron-LM's, T5's) or "
         "after each residual add (post: the original BERT's and Transformer's)"),
        (("--num-layers", "--encoder-num-layers"), "num_layers", dict(type=int),
         "transformer layers (T5: the encoder's; --encoder-num-layers is Megatron-LM's name)"),
        ("--decoder-num-layers", None, dict(type=int),
         "T5: decoder layers (default: as many as the encoder's)"),
        ("--hidden-size", None, dict(type=int), "hidden size h"),
        ("--num-attention-heads", None, dict(type=int), "query heads"),
        ("--ffn-hidden-size", None, dict(type=int), "MLP inner width (default 4h)"),
        ("--kv-channels", None, dict(type=int), "per-head width (default h / heads)"),
        ("--group-query-attention", "_gqa", dict(action="store_true"),
         "grouped-query attention with --num-query-groups key/value heads"),
        ("--num-query-groups", None, dict(type=int), "key/value heads (needs "
         "--group-query-attention)"),
        (("--seq-length", "--encoder-seq-length"), "seq_length", dict(type=int),
         "training sequence length (T5: the encoder's; --encoder-seq-length is Megatron-LM's "
         "name)"),
        ("--decoder-seq-length", None, dict(type=int),
         "T5: decoder tokens per sample (Megatron-LM's T5 runs: 128)"),
        ("--max-position-embeddings", None, dict(type=int),
         "longest supported sequence (default: --seq-length)"),
        ("--vocab-size", None, dict(type=int), "vocabulary size (default: the tokenizer's; "
         "needed with --mock-data unless the preset has one; with --tokenizer-type "
         "NullTokenizer the ids below it, the model's vocabulary is one more: the eod id)"),
        ("--position-embedding-type", None, dict(choices=POSITION_EMBEDDING_TYPES),
         "how positions enter the model"),
        ("--relative-attention-num-buckets", None, dict(type=int),
         "T5 (--position-embedding-type relative): buckets of the relative position bias "
         "(default 32)"),
        ("--relative-attention-max-distance", None, dict(type=int),
         "T5: distances from this on share the last bucket (default 128)"),
        ("--rotary-base", None, dict(type=float), "RoPE base theta"),
        ("--use-rope-scaling", "_rope_scaling", dict(action="store_true"),
         "Llama 3.1 RoPE frequency scaling (model.rope_scaling: llama3; 'linear' and the "
         "low/high frequency factors are set in the YAML model section)"),
        ("--rope-scaling-factor", None, dict(type=float),
         "divisor of the scaled RoPE frequencies (default 8, Llama 3.1's)"),
        ("--rotary-seq-len-interpolation-factor", "_rope_interpolation", dict(type=float),
         "RoPE position interpolation: positions divided by this factor (model.rope_scaling: "
         "linear with this --rope-scaling-factor)"),
        ("--normalization", None, dict(choices=NORMALIZATIONS), "norm layers"),
        ("--norm-epsilon", "layernorm_epsilon", dict(type=float), "epsilon of the norms"),
        ("--swiglu", "_swiglu", dict(action="store_true"), "SwiGLU MLP (activation=swiglu)"),
        ("--openai-gelu", "_openai_gelu", dict(action="store_true"),
         "the tanh approximation of GELU (activation=gelu_tanh, GPT-2's)"),
        ("--activation", None, dict(choices=ACTIVATIONS), "MLP activation"),
        ("--disable-bias-linear", "_no_bias", dict(action="store_true"),
         "no biases in the attention and MLP linears"),
        ("--add-qkv-bias", None, dict(action="store_true"),
         "a bias on the QKV projection even with --disable-bias-linear (Qwen2)"),
        ("--qk-layernorm", None, dict(action="store_true"),
         "normalize each query and key head (--normalization over the head width, one weight "
         "for q and one for k) before the rotary embedding (Qwen3, Qwen3-MoE)"),
        ("--untie-embeddings-and-output-weights", None, dict(action="store_true"),
         "a separate output layer instead of the word embedding"),
        ("--hidden-dropout", None, dict(type=float), "dropout on embeddings and residuals"),
        ("--attention-dropout", None, dict(type=float), "dropout on attention probabilities"),
        ("--init-method-std", None, dict(type=float), "std of the weight init"),
        ("--make-vocab-size-divisible-by", None, dict(type=int),
         "pad the vocabulary to a multiple of this x TP size"),
        ("--recompute-granularity", None, dict(choices=("full", "selective")),
         "activation recompute: every layer, or the attention core only"),
        ("--recompute-activations", "_recompute_activations", dict(action="store_true"),
         "selective activation recompute (= --recompute-granularity selective)"),
        ("--recompute-method", "_recompute_method", dict(choices=("uniform", "block")),
         "with --recompute-granularity full: which layers Megatron-LM recomputes (uniform: "
         "groups of --recompute-num-layers; block: the first --recompute-num-layers of each "
         "stage). megalite recomputes every layer on its own, so the numbers are the same; "
         "a notice says so"),
        ("--recompute-num-layers", "_recompute_num_layers", dict(type=int),
         "layers per recompute group (uniform) or recomputed layers per stage (block); needs "
         "--recompute-method"),
    ]),
    ("mixture of experts (Megatron-LM's flags; megalite.model.moe)", "model", [
        ("--num-experts", None, dict(type=int),
         "experts per MoE layer (default: none, a dense model): the MoE layers replace the MLP "
         "of the layers --moe-layer-freq selects with a router, the experts and the optional "
         "shared expert; needs --disable-bias-linear (experts have no biases)"),
        ("--moe-router-topk", None, dict(type=int),
         "experts per token, k (default 2); each token's output is the weighted sum of its k "
         "experts' outputs, weights the softmax over all experts renormalised over the k "
         "(Mixtral, Qwen3-MoE) unless --moe-router-pre-softmax"),
        ("--moe-ffn-hidden-size", None, dict(type=int),
         "inner width of each expert (default --ffn-hidden-size; with --swiglu the width of "
         "each of its gate and up projections)"),
        ("--moe-layer-freq", None, dict(type=parse_layer_freq, metavar="N|LIST"),
         "MoE layers: every N-th from layer 0, or a 0/1 list per layer such as [1,0,1,0] or "
         "([1]*3+[0])*2 (default 1: all)"),
        ("--moe-shared-expert-intermediate-size", None, dict(type=int),
         "width of the shared expert every token also goes through (Qwen2-MoE, DeepSeek)"),
        ("--moe-shared-expert-gate", None, dict(action="store_true"),
         "scale the shared expert's output by a per-token sigmoid gate (Qwen2-MoE)"),
        ("--moe-router-load-balancing-type", None,
         dict(choices=("aux_loss", "seq_aux_loss", "none")),
         "load-balancing loss (megatron-core's formula: E / (T^2 k) x sum over experts of "
         "tokens routed x summed probability): over each micro-batch's tokens (aux_loss, "
         "default), per sequence (seq_aux_loss), or none"),
        ("--moe-aux-loss-coeff", None, dict(type=float),
         "coefficient of the load-balancing loss (default 0: off); logged as moe_aux_loss, "
         "apart from the LM loss"),
        ("--moe-z-loss-coeff", None, dict(type=float),
         "coefficient of the router z-loss, the mean of logsumexp(router logits)^2 (default: "
         "off); logged as moe_z_loss"),
        ("--moe-router-pre-softmax", None, dict(action="store_true"),
         "weights = the softmax over all experts of the selected ones (no renormalisation over "
         "the top k; Qwen2-MoE's norm_topk_prob false)"),
        ("--moe-expert-capacity-factor", None, dict(type=float),
         "drop the assignments beyond ceil(factor x tokens x k / experts) per expert, lowest "
         "scores first (default: dropless)"),
    ]),
    ("parallelism", "parallel", [
        ("--tensor-model-parallel-size", None, dict(type=int), "tensor-parallel size"),
        ("--pipeline-model-parallel-size", None, dict(type=int), "pipeline stages"),
        ("--expert-model-parallel-size", None, dict(type=int),
         "ranks the experts of each MoE layer are split over, out of the data-parallel ranks "
         "(tokens travel to their experts by all-to-all)"),
        ("--context-parallel-size", None, dict(type=int),
         "ranks each sequence is split over (context parallelism; GPT only)"),
        ("--sequence-parallel", None, dict(action="store_true"),
         "sequence parallelism inside the tensor-parallel group"),
        ("--num-layers-per-virtual-pipeline-stage", None, dict(type=int),
         "interleaved 1F1B with this many layers per virtual stage"),
        ("--num-virtual-stages-per-pipeline-rank", "_virtual_stages", dict(type=int),
         "interleaved 1F1B with this many model chunks per stage (sets "
         "--num-layers-per-virtual-pipeline-stage to layers / (PP x this))"),
        ("--pipeline-layer-split", None, dict(type=int, nargs="+", metavar="N"),
         "layers per pipeline stage, e.g. 3 5 5 3 (default: even)"),
        ("--decoder-first-pipeline-num-layers", "_first_stage_layers", dict(type=int),
         "layers on the first pipeline stage, the others split evenly (sets "
         "--pipeline-layer-split)"),
        ("--decoder-last-pipeline-num-layers", "_last_stage_layers", dict(type=int),
         "layers on the last pipeline stage, the others split evenly (sets "
         "--pipeline-layer-split)"),
        ("--zero-stage", None, dict(type=int, choices=(0, 1, 2, 3)),
         "DeepSpeed ZeRO stage (1: with TP and PP; 2: with TP; 3: neither)"),
        ("--use-distributed-optimizer", "_distributed_optimizer", dict(action="store_true"),
         "shard the optimizer state and fp32 master weights over the data-parallel ranks "
         "(Megatron-LM's distributed optimizer; megalite runs it as --zero-stage 1)"),
        ("--deepspeed-config", None, dict(metavar="FILE"), "a DeepSpeed JSON config to merge"),
        ("--distributed-timeout-minutes", "distributed_timeout_minutes", dict(type=float),
         "timeout of torch.distributed collectives (Megatron-LM's default: 10)"),
        ("--overlap-grad-reduce", None, dict(action="store_true"),
         "all-reduce each data-parallel gradient bucket during the backward pass, as soon as "
         "its last gradient of the step is final (bit-identical gradients)"),
        ("--no-overlap-grad-reduce", "overlap_grad_reduce", dict(action="store_false"),
         "all-reduce the data-parallel gradients after the backward pass"),
    ]),
    ("optimizer and learning rate", "optim", [
        ("--lr", None, dict(type=float), "peak learning rate"),
        ("--min-lr", None, dict(type=float), "learning rate at the end of the decay"),
        ("--lr-warmup-iters", None, dict(type=int), "linear warmup iterations"),
        ("--lr-warmup-samples", None, dict(type=int),
         "linear warmup over this many samples (sample-based: with --train-samples)"),
        ("--lr-warmup-fraction", None, dict(type=float),
         "warmup over this fraction of the decay length (instead of --lr-warmup-iters/"
         "--lr-warmup-samples; Megatron-LM's rule, counted in samples)"),
        ("--lr-warmup-init", None, dict(type=float), "learning rate the warmup starts from"),
        ("--lr-decay-iters", None, dict(type=int), "decay length (default --train-iters)"),
        ("--lr-decay-samples", None, dict(type=int),
         "decay length in samples (sample-based; default --train-samples)"),
        ("--lr-decay-style", None, dict(choices=LR_DECAY_STYLES), "decay after the warmup"),
        (("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"),
         "use_checkpoint_opt_param_scheduler", dict(action="store_true"),
         "on resume, take the learning-rate schedule (lr, min lr, warmup and decay lengths, "
         "decay style) from the checkpoint instead of these flags"),
        (("--override-opt_param-scheduler", "--override-opt-param-scheduler"),
         "override_opt_param_scheduler", dict(action="store_true"),
         "on resume, take the learning-rate schedule from these flags (megalite's default; "
         "without either flag a schedule that differs from the checkpoint's is named in one "
         "line)"),
        ("--weight-decay", None, dict(type=float), "AdamW weight decay (not on biases/norms)"),
        ("--adam-beta1", None, dict(type=float), "AdamW beta1"),
        ("--adam-beta2", None, dict(type=float), "AdamW beta2"),
        ("--adam-eps", None, dict(type=float), "AdamW epsilon"),
        ("--clip-grad", None, dict(type=float), "clip the global gradient norm (0: off)"),
    ]),
    ("precision", "precision", [
        ("--bf16", None, dict(action="store_true"), "bf16 model, fp32 master weights and grads"),
        ("--fp16", None, dict(action="store_true"), "fp16 model with dynamic loss scaling"),
        ("--initial-loss-scale", None, dict(type=float), "fp16: first dynamic loss scale"),
        ("--min-loss-scale", None, dict(type=float), "fp16: lowest dynamic loss scale"),
        ("--loss-scale-window", None, dict(type=int), "fp16: clean iterations before x2"),
        ("--hysteresis", None, dict(type=int), "fp16: overflows tolerated before /2"),
        ("--loss-scale", None, dict(type=float), "fp16: a static loss scale"),
    ]),
    ("data and tokenizer", "data", [
        ("--data-path", None, dict(nargs="+", metavar="[WEIGHT] PREFIX"),
         "token files PREFIX.bin/.idx, optionally weighted: 0.3 A 0.7 B"),
        ("--data-args-path", "_data_args_path", dict(metavar="FILE"),
         "a text file holding the --data-path value (weights and prefixes, separated by "
         "white space), for blends too long for a command line"),
        ("--train-data-path", None, dict(nargs="+", metavar="[WEIGHT] PREFIX"),
         "the training data, used whole (instead of --data-path and --split)"),
        ("--valid-data-path", None, dict(nargs="+", metavar="[WEIGHT] PREFIX"),
         "the validation data, used whole (instead of --data-path and --split)"),
        ("--test-data-path", None, dict(nargs="+", metavar="[WEIGHT] PREFIX"),
         "the test data, used whole (instead of --data-path and --split)"),
        ("--per-split-data-args-path", "_per_split_data_args_path", dict(metavar="FILE"),
         'a JSON file {"train": ..., "valid": ..., "test": ...} holding the three '
         "--*-data-path values (a list or a string of weights and prefixes)"),
        ("--split", None, dict(), "train,valid,test weights over each file's sequences "
         "(its documents, or sentences when the file is sentence-split)"),
        ("--blend-rule", None, dict(choices=("megalite", "megatron")),
         "how the --data-path datasets are interleaved: megalite (Tijdeman's rule: every "
         "dataset's count stays within one sample of its weighted share after every step, "
         "and the blend has exactly the samples asked) or megatron (megatron-core's rule and "
         "sizes, reproducing a Megatron run's blended sample order exactly; it can fall more "
         "than one sample behind a share with three or more datasets)"),
        ("--mock-data", None, dict(action="store_true"), "random tokens, no files"),
        ("--tokenizer-type", None, dict(), _TOKENIZERS + " (default: GPT2BPETokenizer when "
         "--vocab-file or --merge-file is given, as Megatron-LM's pretrain_gpt.py)"),
        ("--tokenizer-model", None, dict(metavar="FILE"), "SentencePiece .model / tokenizer.json"),
        ("--vocab-file", None, dict(metavar="FILE"),
         "vocab.txt of the WordPiece tokenizers, vocab.json of GPT2BPETokenizer"),
        ("--merge-file", None, dict(metavar="FILE"), "merges.txt of GPT2BPETokenizer"),
        ("--data-cache-path", None, dict(metavar="DIR"), "where dataset index caches go"),
        ("--mask-prob", None, dict(type=float), "BERT/T5: the share of the tokens masked (whole "
         "words, in n-grams of up to 3; T5: spans of up to 10)"),
        ("--short-seq-prob", None, dict(type=float), "BERT/T5: the share of samples cut to a "
         "random shorter length"),
        ("--vocab-extra-ids", None, dict(type=int), "T5: sentinel tokens <extra_id_N> appended "
         "to the WordPiece vocabulary for the masked spans (Megatron-LM's T5 runs: 100)"),
        ("--reset-position-ids", None, dict(action="store_true"),
         "GPT: positions restart at 0 after each end-of-document token of a sample"),
        ("--reset-attention-mask", None, dict(action="store_true"),
         "GPT: attention stays inside each document of a sample (block-causal)"),
        ("--eod-mask-loss", None, dict(action="store_true"),
         "GPT: no loss on predicting the token after an end-of-document token"),
    ]),
    ("training and logging", "training", [
        ("--micro-batch-size", None, dict(type=int), "sequences per microbatch per DP rank"),
        ("--global-batch-size", None, dict(type=int),
         "sequences per iteration over all ranks (default: micro x DP)"),
        ("--train-iters", None, dict(type=int), "iterations to train; also sizes the "
         "training data and the learning-rate decay"),
        ("--train-samples", None, dict(type=int),
         "samples to train instead of --train-iters: train_samples // global batch "
         "iterations; sizes the training data (these samples) and the decay "
         "(--lr-decay-samples, default this)"),
        ("--exit-interval", None, dict(type=int),
         "stop after an iteration divisible by N (saving a checkpoint with --save) and exit "
         "0; a rerun with --load continues where it stopped"),
        ("--seed", None, dict(type=int), "random seed"),
        ("--log-interval", None, dict(type=int), "iterations between metric logs"),
        ("--log-throughput", "_log_throughput", dict(action="store_true"),
         "log throughput (megalite always logs TFLOP/s per device, tokens/s and MFU)"),
        ("--eval-interval", None, dict(type=int), "iterations between validation runs"),
        ("--eval-iters", None, dict(type=int), "global batches per validation/test run "
         "(0: none); the validation data holds (train iters // --eval-interval + 1) x this "
         "batches, the test data this many"),
        ("--log-json", None, dict(metavar="FILE"), "append one JSON object per log line"),
        ("--tensorboard-dir", None, dict(metavar="DIR"), "write TensorBoard scalars here"),
        ("--wandb-project", None, dict(metavar="NAME"),
         "log the same scalars to Weights & Biases in this project (needs the wandb "
         "package: pip install 'megalite[wandb]'; WANDB_MODE=offline works without a server)"),
        ("--wandb-exp-name", None, dict(metavar="NAME"), "the W&B run name"),
        ("--wandb-save-dir", None, dict(metavar="DIR"),
         "where W&B writes its files (default: SAVE/wandb)"),
        ("--wandb-entity", None, dict(metavar="NAME"), "the W&B entity (team or user)"),
        ("--peak-tflops", None, dict(type=float),
         "the device's peak TFLOP/s in the training precision, the denominator of the "
         "logged MFU (default: the dense peak from megalite's table of GPUs; on CPU, a "
         "matmul measured at the first log, as for GPUs not in the table)"),
        ("--exit-duration-in-mins", None, dict(type=float), "save and stop after this long"),
        ("--compile", None, dict(action="store_true"),
         "torch.compile (inductor) each transformer layer, the final norm and the loss: fused "
         "norms, rotary embedding, SwiGLU and residual adds; the first iteration compiles "
         "(its time is logged once); numerics equal eager to fp32 rounding. GPT only; not "
         "with MoE layers, --context-parallel-size > 1 or --zero-stage 3"),
    ]),
    ("checkpoints", "training", [
        ("--save", None, dict(metavar="DIR"), "checkpoint directory to write"),
        ("--load", None, dict(metavar="DIR"), "checkpoint directory to resume from (its "
         "'latest'); an existing directory with no checkpoint yet starts from scratch (so a "
         "requeued job can pass --load and --save the same DIR); a missing DIR is an error "
         "[default: no resume]"),
        ("--ckpt-step", None, dict(type=int), "with --load: the checkpoint of this iteration "
         "instead of 'latest'"),
        ("--exit-on-missing-checkpoint", None, dict(action="store_true"),
         "with --load: an error when the directory holds no checkpoint (instead of starting "
         "from scratch)"),
        ("--finetune", None, dict(action="store_true"),
         "with --load: take only the weights (any layout), start at iteration 0 with a fresh "
         "optimizer, learning-rate schedule, data position and seeded random states"),
        ("--pretrained-checkpoint", None, dict(metavar="DIR"),
         "when --load holds no checkpoint (or is not given): start from these weights as "
         "--finetune does; a requeued job then resumes from --load"),
        ("--no-load-optim", None, dict(action="store_true"),
         "with --load: take the weights, iteration and data position, but start a fresh "
         "optimizer (AdamW moments, ZeRO partitions) and loss scaler"),
        ("--no-load-rng", None, dict(action="store_true"),
         "with --load: keep this run's seeded random states instead of the saved ones"),
        ("--no-save-optim", None, dict(action="store_true"),
         "save checkpoints without the optimizer state (and its learning-rate schedule); a "
         "resume from them needs --no-load-optim or --finetune"),
        ("--no-save-rng", None, dict(action="store_true"),
         "save checkpoints without the random states; a resume from them needs "
         "--no-load-rng or --finetune"),
        ("--save-interval", None, dict(type=int), "iterations between checkpoints (needs "
         "--save; default: save only at the end of the run and when stopped by a signal, "
         "--exit-interval or --exit-duration-in-mins)"),
        ("--keep-last", None, dict(type=int, metavar="N"),
         "keep only the newest N complete checkpoints (older ones are removed only after a "
         "newer one is complete; default: keep all)"),
    ]),
    ("launch and planning", "training", [
        ("--dry-run", "_dry_run", dict(action="store_true"),
         "validate the config, layout, data and tokenizer, print the plan (layers per stage, "
         "microbatches, parameters and memory per rank) and exit without training"),
        ("--world-size", "_world_size", dict(type=int),
         "with --dry-run: plan for N processes without launching them (default: the "
         "launcher's world size, else 1)"),
    ]),
]

__all__ = ["OPTIONS"]
