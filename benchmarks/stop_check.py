"""Cost of the per-iteration stop agreement (training/signals.py): one int32 all-reduce (MAX)
over the world, next to the time of a tiny training iteration. Prints JSON.

    python benchmarks/stop_check.py [--world-size 4] [--calls 500]

Runs N gloo processes on this machine (CPU); on GPUs with NCCL the call is one small
all-reduce plus one device->host copy of 4 bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, calls: int, out):
    from megalite.training.signals import StopMonitor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    monitor = StopMonitor(None)
    for _ in range(20):  # warm-up
        monitor.should_stop()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        monitor.should_stop()
        times.append(time.perf_counter() - t)
    if rank == 0:
        out.put({"median_us": statistics.median(times) * 1e6,
                 "p90_us": sorted(times)[int(0.9 * len(times))] * 1e6})
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--calls", type=int, default=500)
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, a.world_size, port, a.calls, q))
             for r in range(a.world_size)]
    for pr in procs:
        pr.start()
    result = q.get(timeout=600)
    for pr in procs:
        pr.join()
    print(json.dumps({"benchmark": "stop_check", "world_size": a.world_size, "calls": a.calls,
                      "backend": "gloo", "cpu_count": os.cpu_count(), **result}))


if __name__ == "__main__":
    main()
