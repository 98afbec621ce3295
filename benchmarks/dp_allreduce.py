"""Data-parallel gradient all-reduce: one collective per tensor vs flattened buckets (gloo).

    python benchmarks/dp_allreduce.py [--dp 2] [--preset tiny-llama] [--layers 8] [--hidden 512]
                                      [--iters 5]

Spawns ``--dp`` CPU processes (gloo, one thread each). Each holds fp32 gradients with the
shapes of a GPT model's parameters (the preset, resized by ``--layers/--hidden``; shapes taken
from a model built on the meta device, so nothing is trained) and times averaging them over
the data-parallel group:

* ``per_tensor``: ``all_reduce`` + divide on every gradient separately;
* ``bucketed_<MiB>``: ``megalite.parallel.grad_sync.allreduce_gradients`` with that bucket
  size (25 MiB is the default; ``inf``: a single bucket), on separate gradient tensors (packed
  into a flat buffer and copied back), and ``..._flat_buffer``: on gradients that are views
  into one flat buffer, as the optimizer's fp32 ``main_grad`` are (reduced in place).

Median over ``--iters`` timed rounds after one warm-up; every variant's result is checked equal
to per_tensor's. Prints one JSON object. A measurement, not a test: no timing asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, args, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.dp))
    torch.set_num_threads(1)
    from megalite.distributed.parallel_state import ParallelState, init_distributed
    from megalite.model import get_preset
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    from megalite.parallel.grad_sync import allreduce_gradients

    init_distributed("gloo")
    ps = ParallelState.build()
    cfg = get_preset(args.preset)
    heads = max(1, args.hidden // 64)
    cfg = cfg.replace(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=heads,
                      num_query_groups=heads if cfg.num_query_groups else None,
                      ffn_hidden_size=None)
    meta = ModelContext(ParallelState.single(), device="meta")
    shapes = [p.shape for p in GPTModel(cfg, meta).parameters()]
    g = torch.Generator().manual_seed(rank)
    source = [torch.randn(s, generator=g) for s in shapes]

    def per_tensor(grads):
        for t in grads:
            dist.all_reduce(t, group=ps.dp_group)
            t.div_(ps.dp_size)

    def separate():                  # one tensor per gradient
        return [t.clone() for t in source]

    def flat_buffer():               # views into one flat buffer (the optimizer's main_grad)
        buf = torch.cat([t.reshape(-1) for t in source])
        out, offset = [], 0
        for t in source:
            out.append(buf[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    variants = {"per_tensor": (per_tensor, separate)}
    for mib in args.buckets:
        nbytes = 2**62 if mib == "inf" else int(float(mib) * 2**20)
        fn = (lambda grads, nbytes=nbytes: allreduce_gradients(grads, ps, bucket_bytes=nbytes))
        variants[f"bucketed_{mib}"] = (fn, separate)
        variants[f"bucketed_{mib}_flat_buffer"] = (fn, flat_buffer)
    results, reference = {}, None
    for name, (fn, make) in variants.items():
        times = []
        for i in range(args.iters + 1):
            grads = make()
            dist.barrier()
            t0 = time.perf_counter()
            fn(grads)
            if i:
                times.append(time.perf_counter() - t0)
        if reference is None:
            reference = grads
        same = all(torch.equal(a, b) for a, b in zip(grads, reference))
        results[name] = {"median_s": statistics.median(times), "equal_to_per_tensor": same}
    if rank == 0:
        numel = sum(t.numel() for t in source)
        with open(out_path, "w") as f:
            json.dump({"benchmark": "dp_allreduce", "dp": args.dp, "tensors": len(source),
                       "parameters": numel, "megabytes_fp32": round(numel * 4 / 2**20, 1),
                       "results": results, "torch": torch.__version__,
                       "machine": platform.machine(), "cpus": os.cpu_count()}, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dp", type=int, default=2, help="data-parallel processes (default 2)")
    ap.add_argument("--preset", default="tiny-llama", help="model recipe preset (default "
                    "tiny-llama)")
    ap.add_argument("--layers", type=int, default=8, help="transformer layers (default 8)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    ap.add_argument("--buckets", nargs="+", default=["1", "25", "inf"],
                    help="bucket sizes in MiB to try, 'inf' = one buffer (default 1 25 inf)")
    ap.add_argument("--iters", type=int, default=5, help="timed rounds (default 5)")
    args = ap.parse_args()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        mp.spawn(_worker, args=(args, _free_port(), out), nprocs=args.dp, join=True)
        with open(out) as f:
            print(json.dumps(json.load(f), indent=1))


if __name__ == "__main__":
    main()
