"""Forward + backward time of one GPT training micro-step, single process, by recompute mode.

    python benchmarks/model_step.py [--preset tiny-llama] [--layers 4] [--hidden 512]
        [--heads 8] [--groups 4] [--ffn 1408] [--vocab 32000] [--batch 4] [--seq 512]
        [--iters 5] [--threads 2]

Builds the preset with the given shape overrides on CPU (TP=1, float32, dropout off), then for
each recompute granularity (none, selective, full) runs ``--iters`` timed steps of
``model(ids, labels).mean().backward()`` after one warm-up step, and reports the median step
time, tokens/s and achieved model GFLOP/s from ``megalite.model.flops.flops_per_iteration``
(model FLOPs: recompute is not counted, so recompute modes show the cost as lower GFLOP/s).
Prints one JSON object. No timing asserts anywhere: this is a measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from megalite.distributed.parallel_state import ParallelState
from megalite.model import flops_per_iteration, get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-llama")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = get_preset(args.preset).replace(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128), seq_length=args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    flops = flops_per_iteration(base, args.batch, args.seq)
    out = {"benchmark": "model_step", "config": vars(args), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(),
           "model_flops_per_step": flops, "modes": {}}
    for gran in (None, "selective", "full"):
        torch.manual_seed(0)
        model = GPTModel(base.replace(recompute_granularity=gran),
                         ModelContext(ParallelState.single()))
        model.init_weights(seed=1)
        times = []
        for i in range(args.iters + 1):
            t0 = time.perf_counter()
            model(ids, labels=ids).mean().backward()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        step = statistics.median(times[1:])
        out["modes"][gran or "none"] = {
            "step_s": round(step, 4), "tokens_per_s": round(args.batch * args.seq / step, 1),
            "model_gflops_per_s": round(flops / step / 1e9, 2)}
        out["parameters"] = sum(p.numel() for p in model.parameters())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
