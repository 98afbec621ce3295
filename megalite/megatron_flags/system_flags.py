"""Megatron-LM's distributed, validation, data, tokenizer and logging flags that megalite
does not implement as such."""
from __future__ import annotations

from megalite.megatron_flags.entry import (MegatronFlag, flag, same_reason, COND, FSDP,
                                           KERNELS, LOG_ONLY, NOTICE, NO_DATALOADER,
                                           OVERLAP, REFUSE, SAME)

GROUPS: list[tuple[str, list[MegatronFlag]]] = [
    ("distributed", [
        flag("--pipeline-model-parallel-layout", REFUSE, None, "use --pipeline-layer-split "
             "(layers per stage)"),
        flag("--model-parallel-size", REFUSE, None, "an old Megatron-LM flag: use "
             "--tensor-model-parallel-size"),
        flag("--no-overlap-p2p-communication", SAME, 0, "megalite's pipeline sends and receives "
             "are not overlapped"),
        flag("--overlap-p2p-communication-warmup-flush", NOTICE, 0, OVERLAP),
        flag("--distributed-backend", NOTICE, None, "megalite uses NCCL on GPUs and gloo on "
             "CPUs"),
        flag("--distributed-timeout-seconds-after-init", NOTICE, None, "megalite keeps "
             "--distributed-timeout-minutes throughout"),
        flag("--no-align-grad-reduce", NOTICE, 0, OVERLAP),
        *same_reason(NOTICE, None, "megalite all-reduces the gradients in its own buckets",
                     "--ddp-num-buckets", "--ddp-bucket-size"),
        flag("--ddp-pad-buckets-for-high-nccl-busbw", NOTICE, 0, "megalite all-reduces the "
             "gradients in its own buckets"),
        flag("--ddp-reduce-scatter-with-fp32-accumulation", SAME, 0, "megalite's gradients "
             "are reduced in fp32"),
        flag("--ddp-average-in-collective", NOTICE, 0, "megalite sums the gradients in the "
             "all-reduce and divides afterwards"),
        flag("--no-gradient-reduce-div-fusion", NOTICE, 0, KERNELS),
        flag("--overlap-param-gather", NOTICE, 0, OVERLAP),
        flag("--overlap-param-gather-with-optimizer-step", NOTICE, 0, OVERLAP),
        flag("--no-align-param-gather", NOTICE, 0, OVERLAP),
        flag("--no-scatter-gather-tensors-in-pipeline", NOTICE, 0, "megalite sends whole "
             "activations between pipeline stages"),
        flag("--use-ring-exchange-p2p", NOTICE, 0, "megalite sends pipeline activations with "
             "torch.distributed point-to-point operations"),
        flag("--local-rank", SAME, None, "megalite reads the local rank from the launcher's "
             "environment (LOCAL_RANK, SLURM_LOCALID, ...)"),
        flag("--lazy-mpu-init", REFUSE, None, "megalite always initializes its process groups"),
        flag("--use-nccl-ub", NOTICE, 0, "megalite does not register NCCL user buffers"),
        flag("--disable-symmetric-registration", NOTICE, 0, "megalite does not register NCCL "
             "user buffers"),
        flag("--fsdp-manual-registration", REFUSE, 0, FSDP),
        flag("--use-sharp", NOTICE, 0, "megalite leaves SHARP to NCCL's own settings"),
        flag("--sharp-enabled-group", NOTICE, None, "megalite leaves SHARP to NCCL's own "
             "settings"),
        flag("--create-all-gather-group", NOTICE, 0, OVERLAP),
        flag("--nccl-communicator-config-path", NOTICE, None, "megalite uses NCCL's default "
             "communicator settings"),
        flag("--use-tp-pp-dp-mapping", REFUSE, 0, "megalite orders ranks TP first, then DP, "
             "then PP; another rank mapping is not implemented"),
        flag("--use-megatron-fsdp", REFUSE, 0, FSDP),
        flag("--data-parallel-sharding-strategy", COND, None, FSDP, ["no_shard"]),
        flag("--outer-dp-sharding-strategy", COND, None, FSDP, ["no_shard"]),
        flag("--fsdp-double-buffer", REFUSE, 0, FSDP),
        flag("--suggested-communication-unit-size", REFUSE, None, FSDP),
        flag("--keep-fp8-transpose-cache", REFUSE, 0, FSDP),
        flag("--enable-full-sharding-in-hsdp", REFUSE, 0, FSDP),
        flag("--use-torch-fsdp2", REFUSE, 0, FSDP),
        flag("--torch-fsdp2-no-reshard-after-forward", REFUSE, 0, FSDP),
        flag("--num-distributed-optimizer-instances", COND, None, "one distributed optimizer "
             "instance over all data-parallel ranks is what megalite implements", ["1"]),
        flag("--cp-comm-type", NOTICE, "+", "megalite's context parallelism passes keys/values "
             "around a ring of point-to-point sends (Megatron's p2p)"),
        flag("--fake-process-group", REFUSE, 0, "megalite needs real process groups"),
        flag("--pipeline-model-parallel-comm-backend", NOTICE, None, "megalite's pipeline "
             "uses the default process-group backend"),
        flag("--hierarchical-context-parallel-sizes", REFUSE, "+", "megalite's context "
             "parallelism is one ring (no hierarchical a2a+p2p)"),
        flag("--max-seqlen-per-dp-cp-rank", REFUSE, None, "megalite's context parallelism "
             "splits every sequence evenly (no dynamic per-rank lengths)"),
        flag("--hybrid-context-parallel", REFUSE, 0, "megalite's context parallelism "
             "splits every sequence evenly (no hybrid CP)"),
        flag("--expert-tensor-parallel-size", REFUSE, None, "megalite splits every expert "
             "over the --tensor-model-parallel-size ranks, as the dense MLP (a separate expert "
             "tensor-parallel size is not implemented)"),
        flag("--account-for-embedding-in-pipeline-split", REFUSE, 0, "use "
             "--pipeline-layer-split (layers per stage) to leave room for the embedding"),
        flag("--account-for-loss-in-pipeline-split", REFUSE, 0, "use --pipeline-layer-split "
             "(layers per stage) to leave room for the output layer"),
        flag("--microbatch-group-size-per-virtual-pipeline-stage", NOTICE, None, "megalite's "
             "interleaved schedule runs pipeline-size microbatches per virtual stage"),
        flag("--defer-embedding-wgrad-compute", NOTICE, 0, OVERLAP),
        flag("--wgrad-deferral-limit", NOTICE, None, OVERLAP),
        flag("--delay-wgrad-compute", NOTICE, 0, OVERLAP),
    ]),
    ("validation", [
        flag("--skip-train", REFUSE, 0, "evaluation without training is not implemented"),
        flag("--test-mode", REFUSE, 0, "Megatron-LM's test mode is not implemented"),
        flag("--full-validation", REFUSE, 0, "megalite evaluates --eval-iters batches"),
        flag("--multiple-validation-sets", REFUSE, 0, "megalite evaluates one blended "
             "validation set"),
        flag("--eval-global-batch-size", REFUSE, None, "megalite evaluates with the training "
             "batch size"),
        flag("--eval-micro-batch-size", REFUSE, None, "megalite evaluates with the training "
             "batch size"),
    ]),
    ("data and dataloader", [
        flag("--phase-transition-iterations", REFUSE, None, "training phases are not "
             "implemented"),
        flag("--per-dataset-sequences-path", NOTICE, None, "megalite reads the sequence counts "
             "from the .idx files"),
        flag("--dataloader-fast-cache-load", NOTICE, 0, "megalite memory-maps its cached "
             "indices when they exist"),
        flag("--dataloader-defer-npy-index-mmap", NOTICE, 0, "megalite memory-maps its cached "
             "indices at start-up"),
        flag("--no-mmap-bin-files", NOTICE, 0, "megalite always memory-maps the token files"),
        flag("--sample-rate", REFUSE, None, "is not used by GPT pretraining"),
        flag("--num-workers", NOTICE, None, NO_DATALOADER + " (no worker processes)"),
        flag("--no-create-attention-mask-in-dataloader", SAME, 0, "megalite never builds "
             "attention masks: attention is causal, or follows per-token document ids with "
             "--reset-attention-mask"),
        flag("--num-dataset-builder-threads", NOTICE, None, "megalite builds the dataset "
             "indices in C++ on rank 0"),
        flag("--object-storage-cache-path", REFUSE, None, "object storage is not "
             "implemented: the token files are local"),
        flag("--mid-level-dataset-surplus", COND, None, "megalite asks each blended dataset "
             "for 0.5% more samples than its share, Megatron-LM's default", ["0.005"]),
        flag("--allow-ambiguous-pad-tokens", NOTICE, 0, "megalite's GPT pretraining pads "
             "nothing"),
    ]),
    ("tokenizer", [
        flag("--padded-vocab-size", REFUSE, None, "megalite pads the vocabulary to a multiple "
             "of --make-vocab-size-divisible-by x TP"),
        flag("--tokenizer-metadata", REFUSE, None, "megalite builds the tokenizer from "
             "--tokenizer-type and its files"),
        flag("--tokenizer-special-tokens", REFUSE, "+", "megalite uses the special tokens of "
             "the tokenizer's files"),
        flag("--legacy-tokenizer", NOTICE, 0, "megalite has one implementation of each "
             "tokenizer type"),
        flag("--tiktoken-pattern", NOTICE, None, "used only by TikTokenizer, which megalite "
             "does not implement"),
        flag("--tiktoken-num-special-tokens", NOTICE, None, "used only by TikTokenizer, which "
             "megalite does not implement"),
        flag("--tiktoken-special-tokens", NOTICE, "+", "used only by TikTokenizer, which "
             "megalite does not implement"),
        flag("--tokenizer-sentencepiece-legacy", NOTICE, 0, "megalite's SentencePiece "
             "tokenizer never turns text into control tokens"),
        flag("--tokenizer-hf-use-fast", SAME, 0, "megalite reads tokenizer.json with the "
             "(fast) tokenizers library"),
        flag("--tokenizer-hf-include-special-tokens", NOTICE, 0, "megalite adds no special "
             "tokens when encoding (the data is already tokenized)"),
        flag("--trust-remote-code", NOTICE, 0, "megalite never runs code from tokenizer files"),
    ]),
    ("logging", [
        flag("--log-params-norm", NOTICE, 0, LOG_ONLY),
        flag("--log-progress", NOTICE, 0, LOG_ONLY),
        flag("--timing-log-level", NOTICE, None, "megalite logs the time per iteration"),
        flag("--timing-log-option", NOTICE, None, "megalite logs the time per iteration"),
        flag("--tensorboard-log-interval", NOTICE, None, "megalite writes TensorBoard at "
             "every --log-interval"),
        flag("--tensorboard-queue-size", NOTICE, None, "megalite flushes TensorBoard at every "
             "log"),
        flag("--log-timers-to-tensorboard", NOTICE, 0, LOG_ONLY),
        flag("--no-log-loss-scale-to-tensorboard --disable-log-loss-scale-to-tensorboard",
             NOTICE, 0, "megalite always logs the loss scale"),
        flag("--log-validation-ppl-to-tensorboard", SAME, 0, "megalite always logs the "
             "validation perplexity"),
        flag("--log-memory-to-tensorboard", SAME, 0, "megalite always logs the peak memory"),
        flag("--log-memory-interval", NOTICE, None, "megalite logs the peak memory at every "
             "--log-interval"),
        flag("--log-device-memory-used", NOTICE, 0, "megalite logs PyTorch's peak allocated "
             "memory"),
        flag("--log-num-zeros-in-grad", NOTICE, 0, LOG_ONLY),
        flag("--log-max-attention-logit", NOTICE, 0, LOG_ONLY),
        flag("--no-barrier-with-level-1-timing", NOTICE, 0, "megalite logs the time per "
             "iteration"),
        flag("--log-world-size-to-tensorboard", NOTICE, 0, LOG_ONLY),
        flag("--logging-level", NOTICE, None, "megalite prints its lines on rank 0"),
        flag("--log-energy", NOTICE, 0, LOG_ONLY),
        flag("--config-logger-dir", NOTICE, None, "megalite stores the run's configuration in "
             "every checkpoint (config.json)"),
    ]),
]
