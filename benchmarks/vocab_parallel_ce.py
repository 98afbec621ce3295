"""Vocabulary-parallel cross-entropy vs gathering the full logits, in real gloo processes.

    python benchmarks/vocab_parallel_ce.py [--tp 2] [--tokens 2048] [--vocab 32768] [--iters 5]

Spawns ``--tp`` CPU processes (gloo, one thread each). Each rank holds fp32 logits for its
vocabulary slice ``[tokens, vocab/tp]`` and times forward + backward of

* ``vocab_parallel``: ``megalite.parallel.cross_entropy.vocab_parallel_cross_entropy`` (exchanges
  3 numbers per token: max, sum of exponentials, target logit), and
* ``gather_then_ce``: all-gather the logits to ``[tokens, vocab]`` then ``F.cross_entropy``
  (what one would do without it),

reporting the median over ``--iters`` timed steps after one warm-up, the peak extra memory that the
full logits imply, the bytes each rank sends per step, and the max difference between the two
losses. Prints one JSON object. No timing asserts anywhere: a measurement, not a test.
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
import torch.nn.functional as F


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, args, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.tp))
    torch.set_num_threads(1)
    from megalite.distributed.parallel_state import ParallelState, init_distributed
    from megalite.parallel.comm import gather_from_tp_region
    from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy

    init_distributed("gloo")
    ps = ParallelState.build(tensor_model_parallel_size=args.tp)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(args.tokens, args.vocab, generator=g) * 3
    target = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    local = full.chunk(args.tp, -1)[ps.tp_rank].clone()
    del full

    def vocab_parallel():
        x = local.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, target, ps)
        loss.mean().backward()
        return loss.detach()

    def gather_then_ce():
        x = local.clone().requires_grad_()
        loss = F.cross_entropy(gather_from_tp_region(x, ps), target, reduction="none")
        loss.mean().backward()
        return loss.detach()

    diff = (vocab_parallel() - gather_then_ce()).abs().max().item()
    result = {"vocab_parallel_s": _time(vocab_parallel, args.iters),
              "gather_then_ce_s": _time(gather_then_ce, args.iters), "max_loss_diff": diff}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if args.vocab % args.tp:
        ap.error(f"--vocab {args.vocab} is not divisible by --tp {args.tp}")
    out_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vpce-{os.getpid()}.json")
    mp.spawn(_worker, args=(args, _free_port(), out_path), nprocs=args.tp, join=True)
    with open(out_path) as f:
        result = json.load(f)
    os.unlink(out_path)
    fp32 = 4
    result.update(
        tp=args.tp, tokens=args.tokens, vocab=args.vocab, iters=args.iters,
        # ring all-reduce / all-gather: each rank sends ~(tp-1)/tp of the collective's payload
        # (x2 for all-reduce); forward only (the gather's backward is a local split).
        bytes_sent_per_rank_vocab_parallel=int(2 * 3 * args.tokens * fp32 * (args.tp - 1) / args.tp),
        bytes_sent_per_rank_gather=int(args.tokens * args.vocab * fp32 * (args.tp - 1) / args.tp),
        full_logits_bytes_per_rank=args.tokens * args.vocab * fp32,
        machine=f"{platform.machine()} {os.cpu_count()} cpus", torch=torch.__version__)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
