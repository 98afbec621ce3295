"""Optimizer step cost and optimizer-state memory: megalite's Optimizer and DeepSpeed ZeRO.

Two parts, printed as one JSON object:

* ``single``: one process, a GPT model with fixed random gradients copied in (the copy is
  timed too, equally for all); the time of one optimizer step (clip + AdamW), interleaved
  rounds, for plain torch (``clip_grad_norm_`` + ``torch.optim.AdamW``) vs
  megalite's ``Optimizer`` in fp32 (norm, clip, AdamW) and bf16 (also the fp32 master copy
  back into the bf16 model). Median of ``--iters`` rounds after one warm-up round.
* ``dp``: ``--dp`` gloo processes (one thread each); ``finish_grad_sync + step`` of megalite's
  Optimizer (bucketed all-reduce, replicated AdamW) vs ZeRO-1/2 (DeepSpeed reduce-scatter,
  sharded AdamW, all-gather), and the optimizer-state bytes per rank.

    python benchmarks/optimizer_step.py --layers 4 --hidden 512 --iters 5 --dp 2
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
import torch.multiprocessing as mp


def build(args, ps):
    from megalite.model import get_preset
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    cfg = get_preset("tiny-llama").replace(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
        num_query_groups=4, ffn_hidden_size=args.hidden * 11 // 4, vocab_size=args.vocab,
        max_position_embeddings=128, seq_length=128)
    model = GPTModel(cfg, ModelContext(ps))
    model.init_weights(1)
    return model


_GRADS: dict = {}


def fill_grads(model, seed):
    """Set every gradient (``main_grad`` in bf16) to fixed random values (drawn once; a copy
    per call, since clipping scales them in place)."""
    params = list(model.parameters())
    if seed not in _GRADS:
        g = torch.Generator().manual_seed(seed)
        _GRADS[seed] = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    for p, grad in zip(params, _GRADS[seed]):
        if hasattr(p, "main_grad"):
            p.main_grad.copy_(grad)
        elif p.grad is None:
            p.grad = grad.to(p.dtype)
        else:
            p.grad.copy_(grad)


def median_time(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def single(args):
    from megalite.config import OptimConfig, PrecisionConfig
    from megalite.distributed.parallel_state import ParallelState
    from megalite.optim.base import param_groups
    from megalite.optim.optimizer import Optimizer
    ps = ParallelState.single()
    steps = {}
    model = build(args, ps)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups([model], 0.1)]
    adamw = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    params = list(model.parameters())

    def plain(model=model):
        fill_grads(model, 0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        adamw.step()
    steps["plain_torch_s"] = plain
    for name, prec in (("megalite_fp32_s", PrecisionConfig()),
                       ("megalite_bf16_s", PrecisionConfig(bf16=True))):
        m = build(args, ps)
        opt = Optimizer([m], OptimConfig(clip_grad=1.0), prec, ps)

        def step(m=m, opt=opt):
            fill_grads(m, 0)
            opt.step(1e-4)
        steps[name] = step
    # Interleaved (one step of each variant per round), so load swings on a shared machine
    # hit all variants alike; median over the rounds after a warm-up round.
    times: dict = {k: [] for k in steps}
    for round_ in range(args.iters + 1):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["parameters"] = sum(p.numel() for p in params)
    return out


def _dp_worker(rank, args, store, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.dp), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megalite.config import OptimConfig, PrecisionConfig
    from megalite.distributed.parallel_state import ParallelState
    from megalite.optim.optimizer import Optimizer
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=args.dp)
    ps = ParallelState.build()
    result = {}
    for stage in (0, 1, 2):
        model = build(args, ps)
        optim, prec = OptimConfig(clip_grad=1.0), PrecisionConfig()
        if stage:
            from megalite.optim.zero import ZeroOptimizer
            opt = ZeroOptimizer([model], optim, prec, ps, stage)
        else:
            opt = Optimizer([model], optim, prec, ps)

        def step():
            fill_grads(model, rank)
            opt.finish_grad_sync()
            opt.step(1e-4)
            opt.zero_grad()
        t = median_time(step, args.iters)
        t = torch.tensor(t)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        result[f"zero{stage}"] = {"sync_and_step_s": float(t),
                                  "optimizer_state_bytes": opt.optimizer_state_bytes()}
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def data_parallel(args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_dp_worker, args=(r, args, os.path.join(tmp, "store"), queue))
                 for r in range(args.dp)]
        for p in procs:
            p.start()
        result = queue.get(timeout=1800)
        for p in procs:
            p.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dp", type=int, default=2, help="data-parallel processes (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"args": vars(args), "single": single(args)}
    if args.dp > 1:
        out["dp"] = data_parallel(args)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
