"""The training loop at PP=2 (gloo) of this tree against another revision's (the lean step).

    python benchmarks/pp_step.py --before REV [--rounds 4] [--warmup 2] [--steps 8]
        [--layers 4] [--hidden 512] [--ffn 1408] [--vocab 32000] [--seq 256]
        [--global-batch 8] [--micro-batch 1] [--threads 1]

``REV`` (e.g. the merge base with main) is checked out in a temporary ``git worktree``. Each
round runs the same job once with each tree, in alternating order (so load drift hits both
alike): two processes, pipeline stages 0 and 1, LLaMA-recipe ``--mock-data`` model,
``Trainer.train()`` (the real loop: batches, the 1F1B schedule and its p2p, the optimizer, the
loss mean and stop agreement, logging every ``--log-interval``), first ``--warmup`` iterations,
then ``--steps`` timed ones (rank 0's wall clock, per iteration). Both trees must give the same
losses (the lean step changes no number): ``losses_identical``. Prints one JSON object:
per-tree median seconds per iteration over the rounds, the ratio before / this tree and the
median of the per-round ratios, and the same for CPU seconds per iteration (both ranks'
``time.process_time``, threads included: the load-robust measure of the work done on this
shared machine, blind to time spent waiting). Not a test: no assertion on time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from dp_step import add_shape_args, shape_flags  # noqa: E402


def job_argv(args, iters: int) -> list[str]:
    return shape_flags(args) + [
        "--train-iters", str(iters), "--lr", "3e-4", "--min-lr", "3e-5",
        "--lr-warmup-iters", "2", "--lr-decay-iters", str(iters),
        "--log-interval", str(args.log_interval), "--pipeline-model-parallel-size", "2"]


def _worker(rank: int, store: str, args, out_path: str) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist

    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(args.threads)
    trainer = Trainer(parse_train_args(job_argv(args, args.warmup + args.steps)))
    full = trainer.config
    # warm-up iterations first (same run), then the timed ones
    trainer.config = dataclasses.replace(
        full, training=dataclasses.replace(full.training, train_iters=args.warmup))
    warm = trainer.train().losses
    trainer.config = full
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    timed = trainer.train().losses
    seconds = time.perf_counter() - t0
    cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
    dist.all_reduce(cpu)            # both ranks' CPU seconds (threads included)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"s_per_iter": seconds / args.steps,
                       "cpu_s_per_iter": cpu.item() / args.steps, "losses": warm + timed}, f)
    dist.destroy_process_group()


def run_tree(tree: str, args) -> dict:
    """One job with ``tree``'s megalite (a subprocess: PYTHONPATH=tree)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", out] + sys.argv[1:]
        env = {**os.environ, "PYTHONPATH": tree}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default=None, help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    add_shape_args(ap, micro_batch=1)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main() -> None:
    argv = sys.argv[1:]
    if "--worker" in argv:
        i = argv.index("--worker")
        out_path = argv[i + 1]
        args = parse(argv[:i] + argv[i + 2:])
        import torch.multiprocessing as mp
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(os.path.join(tmp, "store"), args, out_path), nprocs=2)
        return
    args = parse(argv)
    if not args.before:
        raise SystemExit("--before REV is required")
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = os.path.join(tmp, "before")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", before_tree,
                        args.before], check=True, capture_output=True)
        try:
            trees = {"before": before_tree, "lean": ROOT}
            results = {name: [] for name in trees}
            for r in range(args.rounds):
                order = list(trees) if r % 2 == 0 else list(trees)[::-1]
                for name in order:
                    results[name].append(run_tree(trees[name], args))
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before_tree],
                           check=False, capture_output=True)
    per = {n: [x["s_per_iter"] for x in v] for n, v in results.items()}
    med = {n: statistics.median(v) for n, v in per.items()}
    cpu = {n: [x["cpu_s_per_iter"] for x in v] for n, v in results.items()}
    cpu_med = {n: statistics.median(v) for n, v in cpu.items()}
    losses = {n: v[0]["losses"] for n, v in results.items()}
    print(json.dumps({
        "benchmark": "pp_step", "config": vars(args),
        "s_per_iter_median": {n: round(v, 4) for n, v in med.items()},
        "before_over_lean": round(med["before"] / med["lean"], 4),
        "median_round_ratio": round(statistics.median(
            b / a for b, a in zip(per["before"], per["lean"])), 4),
        "s_per_iter_all": {n: [round(x, 4) for x in v] for n, v in per.items()},
        "cpu_s_per_iter_median": {n: round(v, 4) for n, v in cpu_med.items()},
        "cpu_before_over_lean": round(cpu_med["before"] / cpu_med["lean"], 4),
        "cpu_s_per_iter_all": {n: [round(x, 4) for x in v] for n, v in cpu.items()},
        "losses_identical": losses["before"] == losses["lean"]
        and all(x["losses"] == losses[n] for n, v in results.items() for x in v),
        "losses": losses["lean"]}, indent=1))


if __name__ == "__main__":
    main()
