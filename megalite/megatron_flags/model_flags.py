"""Megatron-LM's model (transformer configuration) and experimental flags that megalite
does not implement as such."""
from __future__ import annotations

from megalite.megatron_flags.entry import (MegatronFlag, flag, same_reason, ATTENTION, COND,
                                           NOTICE, OFFLOAD, OVERLAP, REFUSE, SAME)

GROUPS: list[tuple[str, list[MegatronFlag]]] = [
    ("model", [
        flag("--window-size", REFUSE, "+", "sliding-window attention is not implemented"),
        flag("--window-attn-skip-freq", REFUSE, None, "sliding-window attention is not "
             "implemented"),
        flag("--use-rotary-position-embeddings", REFUSE, 0, "an old Megatron-LM flag: use "
             "--position-embedding-type rope"),
        flag("--no-position-embedding", REFUSE, 0, "an old Megatron-LM flag: use "
             "--position-embedding-type"),
        flag("--rotary-percent", COND, None, "rotary embeddings on part of each head are not "
             "implemented", ["1.0", "1"]),
        flag("--rotary-interleaved", REFUSE, 0, "megalite rotates the two halves of each head "
             "(interleaved pairs are not implemented)"),
        flag("--no-rope-freq", REFUSE, None, "megalite applies the rotary embedding in every "
             "layer"),
        flag("--squared-relu", REFUSE, 0, "megalite's activations are gelu, gelu_tanh "
             "(--openai-gelu), swiglu, relu and geglu (T5 v1.1's, tanh GELU)"),
        flag("--quick-geglu", REFUSE, 0, "megalite's activations are gelu, gelu_tanh, "
             "swiglu, relu and geglu (with the tanh GELU, not the quick one)"),
        flag("--glu-linear-offset", COND, None, "an offset in the GLU is not implemented",
             ["0.0", "0"]),
        flag("--activation-func-clamp-value", REFUSE, None, "clamping the MLP activation is "
             "not implemented"),
        flag("--onnx-safe", NOTICE, None, "megalite does not export to ONNX"),
        flag("--apply-layernorm-1p", REFUSE, 0, "zero-centred norm weights (1 + gamma) are not "
             "implemented"),
        flag("--apply-residual-connection-post-layernorm", REFUSE, 0, "megalite's layers are "
             "pre-norm"),
        flag("--fp32-residual-connection", REFUSE, 0, "megalite keeps the residual stream in "
             "the training precision"),
        flag("--qk-l2-norm", REFUSE, 0, "query/key L2 norms are not implemented (megalite "
             "has --qk-layernorm)"),
        flag("--qk-clip", REFUSE, 0, "query/key clipping is not implemented"),
        flag("--qk-clip-alpha", REFUSE, None, "query/key clipping is not implemented"),
        flag("--qk-clip-threshold", REFUSE, None, "query/key clipping is not implemented"),
        flag("--attention-output-gate", REFUSE, 0, "gated attention output is not implemented"),
        flag("--softmax-type", COND, None, "megalite's attention softmax is the plain one",
             ["vanilla"]),
        flag("--calculate-per-token-loss", SAME, 0, "megalite's loss is already the mean over "
             "every token of the global batch (no token is masked)"),
        flag("--multi-latent-attention", REFUSE, 0, "multi-latent attention is not implemented"),
        flag("--experimental-attention-variant", REFUSE, None, "only standard attention is "
             "implemented"),
        flag("--embedding-init-method-std", REFUSE, None, "megalite initializes the embedding "
             "with --init-method-std"),
        *same_reason(NOTICE, 0, "megalite builds the model and initializes the same full "
                     "weights on every layout itself (a --load checkpoint then replaces them)",
                     "--init-model-with-meta-device", "--use-cpu-initialization",
                     "--no-initialization"),
        flag("--apply-query-key-layer-scaling", NOTICE, 0, ATTENTION),
        flag("--disable-bf16-reduced-precision-matmul", NOTICE, 0, "megalite leaves PyTorch's "
             "matmul settings alone"),
        flag("--recompute-modules", COND, "+", "megalite's selective recompute is the attention "
             "core", ["core_attn"]),
        flag("--distribute-saved-activations", NOTICE, 0, "megalite keeps each recomputed "
             "layer's input whole on every tensor-parallel rank"),
        flag("--cpu-offloading-num-layers", COND, None, OFFLOAD, ["0"]),
        flag("--fine-grained-activation-offloading", REFUSE, 0, OFFLOAD),
        flag("--offload-modules", REFUSE, "+", OFFLOAD),
        flag("--min-offloaded-tensor-size", REFUSE, None, OFFLOAD),
        flag("--deterministic-mode", NOTICE, 0, "megalite does not switch PyTorch to "
             "deterministic algorithms (on CPU its runs repeat bit for bit)"),
        flag("--no-async-tensor-model-parallel-allreduce "
             "--disable-async-tensor-model-parallel-allreduce", NOTICE, 0, "deprecated and "
             "ignored in Megatron-LM too"),
        *same_reason(NOTICE, 0, OVERLAP, "--tp-comm-overlap",
                     "--no-tp-comm-bulk-wgrad --disable-tp-comm-bulk-wgrad",
                     "--no-tp-comm-bulk-dgrad --disable-tp-comm-bulk-dgrad",
                     "--no-tp-comm-overlap-ag --disable-tp-comm-overlap-ag",
                     "--no-tp-comm-overlap-rs --disable-tp-comm-overlap-rs",
                     "--tp-comm-overlap-rs-dgrad",
                     "--no-tp-comm-split-ag --disable-tp-comm-split-ag",
                     "--no-tp-comm-split-rs --disable-tp-comm-split-rs"),
        flag("--tp-comm-bootstrap-backend", NOTICE, None, OVERLAP),
        flag("--cross-entropy-loss-fusion", NOTICE, 0, "megalite's vocab-parallel cross "
             "entropy is its own (plain PyTorch operations)"),
        flag("--cross-entropy-fusion-impl", NOTICE, None, "megalite's vocab-parallel cross "
             "entropy is its own (plain PyTorch operations)"),
        flag("--attention-backend", NOTICE, None, ATTENTION),
        flag("--transformer-impl", NOTICE, None, "megalite's transformer layers are its own "
             "(no Transformer Engine)"),
        *same_reason(NOTICE, 0, "megalite does not capture CUDA graphs",
                     "--enable-cuda-graph", "--external-cuda-graph"),
        *same_reason(NOTICE, None, "megalite does not capture CUDA graphs",
                     "--cuda-graph-impl", "--cuda-graph-warmup-steps"),
        flag("--cuda-graph-scope", NOTICE, "+", "megalite does not capture CUDA graphs"),
        flag("--no-clone-scatter-output-in-embedding "
             "--disable-clone-scatter-output-in-embedding", NOTICE, 0, "megalite's "
             "sequence-parallel embedding output is its own"),
        flag("--batch-invariant-mode", NOTICE, 0, "megalite runs PyTorch's default kernels"),
        flag("--use-te-activation-func", NOTICE, 0, "megalite has no Transformer Engine "
             "kernels"),
        flag("--symmetric-ar-type", NOTICE, None, "megalite's all-reduces are "
             "torch.distributed's"),
        flag("--moe-extended-tp", NOTICE, 0, "deprecated and ignored in Megatron-LM too"),
        flag("--use-kitchen-attention", REFUSE, 0, "quantized attention kernels are not "
             "implemented"),
        flag("--kitchen-attention-backend", REFUSE, None, "quantized attention kernels are "
             "not implemented"),
        flag("--first-last-layers-bf16", REFUSE, 0, "FP8/FP4 training is not implemented"),
        flag("--num-layers-at-start-in-bf16", REFUSE, None, "FP8/FP4 training is not "
             "implemented"),
        flag("--num-layers-at-end-in-bf16", REFUSE, None, "FP8/FP4 training is not "
             "implemented"),
        flag("--flash-decode", NOTICE, 0, "training does not decode"),
        flag("--mlp-chunks-for-prefill", NOTICE, None, "training does not prefill"),
        flag("--is-hybrid-model", REFUSE, 0, "hybrid (Mamba) models are not implemented"),
        flag("--mrope-section", REFUSE, "+", "multimodal rotary embeddings are not implemented"),
        flag("--use-fused-weighted-squared-relu", REFUSE, 0, "megalite's experts use the "
             "model's activation (squared ReLU is not implemented)"),
        flag("--overlap-moe-expert-parallel-comm", NOTICE, 0, "megalite does not overlap "
             "the expert all-to-all with computation"),
        flag("--ep-overlap-early-attn-memory-release", NOTICE, 0, "megalite does not overlap "
             "the expert all-to-all with computation"),
        flag("--moe-grouped-gemm", SAME, 0, "megalite computes the experts with one grouped "
             "GEMM per linear whenever this torch has one for the dtype"),
        flag("--moe-token-dispatcher-type", NOTICE, None, "megalite dispatches locally, or "
             "all-to-all with expert parallelism"),
        flag("--moe-router-dtype", COND, None, "megalite's router runs in fp32", ["fp32"]),
        flag("--moe-permute-fusion", NOTICE, 0, "megalite has no fused permutation kernels"),
        flag("--moe-router-fusion", NOTICE, 0, "megalite has no fused router kernels"),
        flag("--moe-per-layer-logging", NOTICE, 0, "megalite logs the router losses averaged "
             "over the MoE layers and the tokens per expert summed over them"),
        flag("--moe-shared-expert-overlap", NOTICE, 0, "megalite runs the shared experts after "
             "the routed ones"),
        flag("--no-fp8-wgrad --disable-fp8-wgrad", REFUSE, 0, "FP8 training is not implemented"),
        flag("--disable-mamba-mem-eff-path", REFUSE, 0, "hybrid (Mamba) models are not "
             "implemented"),
        flag("--te-precision-config-file", REFUSE, None, "Transformer Engine precision recipes "
             "are not implemented"),
    ]),
    ("experimental", [
        flag("--yaml-cfg", REFUSE, None, "use --config FILE.yaml (megalite's sections and keys)"),
        flag("--spec", REFUSE, "+", "megalite builds its own GPT layers"),
        flag("--enable-experimental", NOTICE, 0, "megalite has no experimental switch"),
        flag("--use-precision-aware-optimizer", REFUSE, 0, "megalite keeps fp32 optimizer "
             "state and master weights"),
        flag("--main-grads-dtype", COND, None, "megalite's main gradients are fp32", ["fp32"]),
        flag("--main-params-dtype", COND, None, "megalite's master weights are fp32", ["fp32"]),
        flag("--exp-avg-dtype", COND, None, "megalite's Adam moments are fp32", ["fp32"]),
        flag("--exp-avg-sq-dtype", COND, None, "megalite's Adam moments are fp32", ["fp32"]),
        flag("--sft", REFUSE, 0, "supervised fine-tuning data is not implemented"),
    ]),
]
