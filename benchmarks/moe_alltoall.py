"""Expert-parallel token dispatch: all-to-all bytes per token, and time against local dispatch.

    python benchmarks/moe_alltoall.py [--ep 2] [--tokens 4096] [--hidden 1024] [--experts 8]
                                      [--topk 2] [--dtype bf16] [--iters 5]

Spawns ``--ep`` CPU processes (gloo, one thread each) forming one expert-parallel group. Every
rank routes ``--tokens`` tokens (top-k of random router logits: ``uniform`` routing, and
``skewed``: logits + 2 on expert 0, so it gets far more than its share) and runs
``AllToAllDispatcher`` dispatch -> identity experts -> combine -> backward, counting the bytes
each rank hands to ``all_to_all_single`` for *other* ranks (rows to itself never leave it):

* ``fwd_bytes_per_token``: dispatch + combine rows (the counts exchange is listed apart);
* ``bwd_bytes_per_token``: the reverse all-to-alls of the backward;
* ``rows_per_token``: forward bytes / (one hidden vector's bytes), so the ratio against the
  baseline "each token's hidden vector sent once": ``2 * k * (ep - 1) / ep`` for uniform
  routing (k rows out, k back, a share (ep-1)/ep of them remote);
* ``time_vs_local``: median dispatch+combine+backward time over the same on ``LocalDispatcher``
  with all experts on the rank (no communication), in the same process.

Prints one JSON object. A measurement, not a test: no timing asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter:
    """Wraps ``dist.all_to_all_single`` to add up the bytes sent to other ranks."""

    def __init__(self, rank: int):
        self.rank, self.bytes, self.count_bytes = rank, 0, 0
        self.inner = dist.all_to_all_single

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None,
                 group=None, async_op=False):
        row = input[0].numel() * input.element_size() if input.numel() else 0
        me = dist.get_rank(group)
        if input_split_sizes is None:          # the counts: equal splits of one int64 each
            n = input.numel() // dist.get_world_size(group)
            self.count_bytes += n * input.element_size() * (dist.get_world_size(group) - 1)
        else:
            self.bytes += row * sum(s for r, s in enumerate(input_split_sizes) if r != me)
        return self.inner(output, input, output_split_sizes, input_split_sizes, group=group,
                          async_op=async_op)


def _step(dispatcher, hidden, probs, ids):
    x = hidden.detach().requires_grad_()
    p = probs.detach().requires_grad_()
    rows, _ = dispatcher.dispatch(x, p, ids)
    out = dispatcher.combine(rows * 1.0)            # identity experts
    out.float().sum().backward()


def _worker(rank: int, args, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.ep))
    torch.set_num_threads(1)
    from megalite.distributed.parallel_state import ParallelState, init_distributed
    from megalite.model.moe_dispatch import LocalDispatcher
    from megalite.parallel.expert_dispatch import AllToAllDispatcher

    init_distributed("gloo")
    ps = ParallelState.build(1, 1, expert_model_parallel_size=args.ep)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    counter = _Counter(rank)
    dist.all_to_all_single = counter
    results = {}
    for routing in ("uniform", "skewed"):
        g = torch.Generator().manual_seed(rank)
        hidden = torch.randn(args.tokens, args.hidden, generator=g).to(dtype)
        logits = torch.randn(args.tokens, args.experts, generator=g)
        if routing == "skewed":
            logits[:, 0] += 2.0
        probs, ids = torch.softmax(logits, -1).topk(args.topk, dim=-1)
        ep, local = AllToAllDispatcher(args.experts, ps), LocalDispatcher(args.experts)
        _step(ep, hidden, probs, ids)                # warm-up
        _step(local, hidden, probs, ids)
        times = {"ep": [], "local": []}
        counter.bytes = counter.count_bytes = 0
        x = hidden.detach().requires_grad_()
        p = probs.detach().requires_grad_()
        rows, _ = ep.dispatch(x, p, ids)
        out = ep.combine(rows * 1.0)
        fwd, counts = counter.bytes, counter.count_bytes
        out.float().sum().backward()
        bwd = counter.bytes - fwd
        for _ in range(args.iters):
            for name, d in (("ep", ep), ("local", local)):
                dist.barrier()
                t = time.perf_counter()
                _step(d, hidden, probs, ids)
                times[name].append(time.perf_counter() - t)
        vec = args.hidden * hidden.element_size()
        results[routing] = {
            "fwd_bytes_per_token": fwd / args.tokens, "bwd_bytes_per_token": bwd / args.tokens,
            "count_bytes_per_step": counts, "rows_per_token": fwd / args.tokens / vec,
            "uniform_expectation_rows": 2 * args.topk * (args.ep - 1) / args.ep,
            "ep_s": statistics.median(times["ep"]), "local_s": statistics.median(times["local"]),
            "time_vs_local": statistics.median(times["ep"]) / statistics.median(times["local"]),
        }
    gathered = [None] * args.ep
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(args, _free_port(), out_path), nprocs=args.ep)
        with open(out_path) as f:
            per_rank = json.load(f)
    summary = {}
    for routing in per_rank[0]:
        rows = [r[routing] for r in per_rank]
        summary[routing] = {
            "fwd_bytes_per_token_mean": statistics.mean(r["fwd_bytes_per_token"] for r in rows),
            "fwd_bytes_per_token_max": max(r["fwd_bytes_per_token"] for r in rows),
            "bwd_bytes_per_token_mean": statistics.mean(r["bwd_bytes_per_token"] for r in rows),
            "rows_per_token_mean": statistics.mean(r["rows_per_token"] for r in rows),
            "uniform_expectation_rows": rows[0]["uniform_expectation_rows"],
            "count_bytes_per_step": rows[0]["count_bytes_per_step"],
            "time_vs_local_median": statistics.median(r["time_vs_local"] for r in rows),
        }
    print(json.dumps({"benchmark": "moe_alltoall", "args": vars(args), "torch": torch.__version__,
                      "machine": platform.machine(), "summary": summary, "per_rank": per_rank},
                     indent=1))


if __name__ == "__main__":
    main()
