"""Cost of resuming a ZeRO checkpoint under another ZeRO stage or layout.

``--world`` gloo processes (one thread each; started by tests/distributed/harness.py). A GPT model (LLaMA recipe) takes one step with
ZeRO-1 at DP=world and is saved with ``save_checkpoint``. Then each target builds a fresh model
and optimizer and times ``load_checkpoint`` alone (the slowest rank; median of ``--repeats``):

* ``zero1-same``: the saved layout and stage: DeepSpeed's own partitions come back as they are
  (the baseline every ratio is against);
* ``zero2`` / ``zero3``: same DP, another stage: the state is reassembled by parameter name from
  the saved partitions and written into the new ones (megalite.optim.zero_state);
* ``no-zero``: megalite's optimizer (state replicated over DP, every rank builds all of it);
* ``zero1-tp2`` (world >= 2): TP=2, DP=world/2: the tensors are also resharded over TP.

    python benchmarks/zero_reshard.py --layers 4 --hidden 512 --world 2 --repeats 3
    python benchmarks/zero_reshard.py --layers 4 --hidden 512 --world 2 --repeats 3 \
        --no-verify-checksums
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

TARGETS = {"zero1-same": (1, 1), "zero2": (2, 1), "zero3": (3, 1), "no-zero": (0, 1),
           "zero1-tp2": (1, 2)}


def model_config(args):
    from megalite.model import get_preset
    return get_preset("tiny-llama").replace(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
        num_query_groups=4, ffn_hidden_size=args.hidden * 11 // 4, vocab_size=args.vocab,
        max_position_embeddings=128, seq_length=128)


def build(args, ps, stage):
    from megalite.config import OptimConfig, PrecisionConfig
    from megalite.model.gpt import GPTModel
    from megalite.optim.optimizer import Optimizer
    from megalite.parallel.context import ModelContext
    model = GPTModel(model_config(args), ModelContext(ps))
    model.init_weights(1)
    optim, prec = OptimConfig(clip_grad=1.0), PrecisionConfig()
    if stage:
        from megalite.optim.zero import ZeroOptimizer
        return model, ZeroOptimizer([model], optim, prec, ps, stage)
    return model, Optimizer([model], optim, prec, ps)


def _worker(args, directory):
    """On every rank of the harness's gloo group: save, then time each target's load."""
    import torch.distributed as dist

    from megalite.checkpoint import load_checkpoint, save_checkpoint
    from megalite.distributed.parallel_state import ParallelState
    ps = ParallelState.build()
    model, opt = build(args, ps, 1)
    g = torch.Generator().manual_seed(dist.get_rank())
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt.finish_grad_sync()
    opt.step(1e-4)
    save_checkpoint(directory, 1, model_chunks=[model], optimizer=opt, config={}, ps=ps)
    del model, opt
    result = {}
    for name, (stage, tp) in TARGETS.items():
        if args.world % tp:
            continue
        ps = ParallelState.build(tp, 1)
        times = []
        for _ in range(args.repeats):
            model, opt = build(args, ps, stage)
            dist.barrier()
            start = time.perf_counter()
            extra = load_checkpoint(directory, model_chunks=[model], optimizer=opt, ps=ps,
                                    verify_checksums=not args.no_verify_checksums)
            t = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t))
            del model, opt
        result[name] = {"load_s": statistics.median(times),
                        "resharded": bool(extra["optimizer_resharded"])}
    base = result["zero1-same"]["load_s"]
    for r in result.values():
        r["ratio_to_same_layout"] = r["load_s"] / base
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--world", type=int, default=2, help="gloo processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-verify-checksums", action="store_true",
                        help="load without sha256 verification (sizes are still checked)")
    args = parser.parse_args(argv)
    # The tests' process-group harness: one thread per rank, gloo through a file store, and a
    # crashed or stuck rank fails the run instead of leaving the others waiting.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "tests", "distributed"))
    from harness import run_distributed
    with tempfile.TemporaryDirectory() as tmp:
        result = run_distributed(_worker, args.world, args, os.path.join(tmp, "ckpt"),
                                 timeout=3600)[0]
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    meta = GPTModel(model_config(args), ModelContext(ParallelState.single(), device="meta"))
    params = sum(p.numel() for p in meta.parameters())
    print(json.dumps({"args": vars(args), "parameters": params, "targets": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
