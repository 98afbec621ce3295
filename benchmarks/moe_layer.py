"""MoE layer forward + backward tokens/s: grouped expert compute (one ``torch._grouped_mm`` per
linear over all experts) against a loop over the experts, in the same process and run, on the
same layer, weights and tokens. Prints one JSON object.

    python benchmarks/moe_layer.py --hidden 512 --ffn 1024 --experts 8 --topk 2 \
        --tokens 4096 --iters 5 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megalite.distributed.parallel_state import ParallelState
from megalite.model.config import TransformerConfig
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext


def step_seconds(mlp, x, grad, iters: int) -> float:
    times = []
    for i in range(iters + 1):            # the first is a warm-up
        x.grad = None
        start = time.perf_counter()
        mlp(x).backward(grad)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = TransformerConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=8,
                            vocab_size=128, ffn_hidden_size=args.ffn, activation="swiglu",
                            add_bias_linear=False, normalization="RMSNorm",
                            position_embedding_type="rope", num_experts=args.experts,
                            moe_router_topk=args.topk)
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(0)
    mlp = model.layers["0"].mlp.to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, 1, args.hidden, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(args.tokens, 1, args.hidden, generator=g).to(dtype)
    result = {"hidden": args.hidden, "ffn": args.ffn, "experts": args.experts,
              "topk": args.topk, "tokens": args.tokens, "dtype": args.dtype,
              "threads": args.threads, "torch": torch.__version__}
    for mode in ("loop", "grouped"):
        mlp.experts.grouped = mode == "grouped"
        if mode == "grouped" and not mlp.experts._grouped_ok(x.view(-1, args.hidden)):
            result["grouped"] = "unavailable in this torch for these shapes/dtype"
            continue
        sec = step_seconds(mlp, x, grad, args.iters)
        result[f"{mode}_step_s"] = sec
        result[f"{mode}_tokens_per_s"] = args.tokens / sec
    if "grouped_step_s" in result:
        result["grouped_speedup_vs_loop"] = result["loop_step_s"] / result["grouped_step_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
