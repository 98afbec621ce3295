"""megalite at DP=2 (gloo) with and without --overlap-grad-reduce against torch DDP.

    python benchmarks/dp_step.py [--layers 4] [--hidden 512] [--ffn 1408] [--vocab 32000]
        [--seq 256] [--global-batch 8] [--micro-batch 4] [--warmup 3] [--steps 12]
        [--threads 1] [--bucket-mb 25] [--compile]

Two processes (gloo, one data-parallel rank each) build, from the same initial weights and
on the same ``--mock-data`` batches (rank r takes the r-th microbatch of each step of the
global batch, megalite's order):

* ``overlap``: megalite's ``Trainer.train_step()`` with ``--overlap-grad-reduce``;
* ``no_overlap``: the same with ``--no-overlap-grad-reduce``;
* ``compiled`` (with ``--compile``): ``overlap`` plus megalite's ``--compile`` (its first
  warm-up step compiles);
* ``ddp``: the plain-PyTorch LLaMA-recipe model of ``benchmarks/plain_pytorch_baseline.py``
  wrapped in ``torch.nn.parallel.DistributedDataParallel`` (``bucket_cap_mb`` = ``--bucket-mb``,
  ``no_sync`` on all but the last microbatch), ``clip_grad_norm_``, ``torch.optim.AdamW``, and
  the global-batch mean loss all-reduced for the log, as a user's DDP loop would.

Steps are interleaved with a rotating order (so load drift hits all alike), each after a
barrier (both ranks start together; the time is rank 0's). Reported: per-step medians, ratios
``ddp / overlap`` (speed-up of megalite over DDP), ``no_overlap / overlap`` (the overlap's
gain), the medians of the per-round ratios, and whether the losses agree (megalite's two runs
bit-identical, DDP within 1e-4 relative: fp32 re-association). Prints one JSON object. Not a
test: no assertion on time.
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
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_pytorch_baseline import (BaselineConfig, BaselineGPT, BaselineLoop,  # noqa: E402
                                    from_megalite_state_dict)

from train_step import loadavg  # noqa: E402

from megalite.data.batches import microbatch_sample_ids  # noqa: E402


def shape_flags(args) -> list[str]:
    """``megalite train`` flags of the LLaMA-recipe shape and batch in ``args`` (mock data, no
    evaluation; :func:`add_shape_args`), shared with ``benchmarks/pp_step.py``."""
    return ["--mock-data", "--vocab-size", str(args.vocab), "--num-layers", str(args.layers),
            "--hidden-size", str(args.hidden), "--num-attention-heads", str(args.heads),
            "--seq-length", str(args.seq), "--max-position-embeddings", str(args.seq),
            "--ffn-hidden-size", str(args.ffn), "--micro-batch-size", str(args.micro_batch),
            "--global-batch-size", str(args.global_batch), "--seed", "1234",
            "--eval-iters", "0", "--position-embedding-type", "rope", "--normalization",
            "RMSNorm", "--swiglu", "--disable-bias-linear",
            "--untie-embeddings-and-output-weights", "--group-query-attention",
            "--num-query-groups", str(args.groups)]


def add_shape_args(ap: argparse.ArgumentParser, micro_batch: int) -> None:
    """The model shape (the issue's: 4 x h512, ffn 1408, vocab 32000, seq 256, batch 8) and
    threads per rank."""
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=8, help="key/value heads")
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=micro_batch)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")


def megalite_argv(args, overlap: bool) -> list[str]:
    return shape_flags(args) + [
        "--train-iters", str(args.warmup + args.steps), "--lr", "3e-4", "--min-lr", "3e-5",
        "--lr-warmup-iters", str(args.warmup), "--lr-decay-style", "cosine",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "1000000",
        "--overlap-grad-reduce" if overlap else "--no-overlap-grad-reduce"]


class DDPLoop(BaselineLoop):
    """The baseline loop under DDP: this rank's microbatches of each global batch."""

    def __init__(self, model, dataset, *, rank: int, world: int, bucket_mb: float, lr_at,
                 **kw):
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
        super().__init__(ddp, dataset, **kw)
        self.rank, self.world = rank, world
        # megalite's own schedule object (Megatron-LM's rule: the first warm-up step at
        # lr_at(0)), so both loops take the same steps whatever the baseline's helper does
        self.lr_at = lr_at

    def step(self) -> float:
        self.model.train()
        ids = microbatch_sample_ids(self.global_batch, self.micro, self.world, self.rank,
                                    self.iteration * self.global_batch)
        self.iteration += 1
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros(1, dtype=torch.float64)
        for j, mb in enumerate(ids):
            x, y = self.get_batch(mb)
            last = j == len(ids) - 1
            if last:
                loss = self.model(x, y)
                (loss / len(ids)).backward()
            else:
                with self.model.no_sync():
                    loss = self.model(x, y)
                    (loss / len(ids)).backward()
            total += loss.detach().double()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        lr = self.lr_at(self.iteration - 1)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        dist.all_reduce(total)      # the global-batch mean for the log
        return float(total.item()) / (len(ids) * self.world)


def worker(rank: int, world: int, store: str, args, out_path: str) -> None:
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    torch.set_num_threads(args.threads)
    runners = {}
    variants = [("overlap", True, []), ("no_overlap", False, [])]
    if args.compile:
        variants.append(("compiled", True, ["--compile"]))
    for name, overlap, extra in variants:
        trainer = Trainer(parse_train_args(megalite_argv(args, overlap) + extra))
        runners[name] = (lambda t: (lambda: t.train_step()[0]))(trainer)
    (chunk,) = trainer.model_chunks
    m = trainer.config.model
    bcfg = BaselineConfig(recipe="llama", num_layers=m.num_layers, hidden_size=m.hidden_size,
                          num_heads=m.num_attention_heads, num_kv_heads=m.query_groups,
                          ffn_size=m.ffn_size, vocab_size=m.vocab_size, seq_length=args.seq,
                          eps=m.layernorm_epsilon, rope_base=m.rotary_base)
    model = BaselineGPT(bcfg)
    model.load_state_dict(from_megalite_state_dict(chunk.full_state_dict(), bcfg), strict=True)
    o = trainer.config.optim
    ddp = DDPLoop(model, trainer.train_data.dataset, rank=rank, world=world,
                  bucket_mb=args.bucket_mb, lr_at=trainer.lr_schedule.lr_at,
                  micro=args.micro_batch,
                  global_batch=args.global_batch, lr=o.lr, min_lr=o.min_lr,
                  warmup=o.lr_warmup_iters, decay=trainer.config.training.train_iters,
                  weight_decay=o.weight_decay, betas=(o.adam_beta1, o.adam_beta2),
                  eps=o.adam_eps, clip=o.clip_grad)
    runners["ddp"] = ddp.step
    names = list(runners)
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    for k in range(args.warmup + args.steps):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            losses[name].append(runners[name]())
            dt = time.perf_counter() - t0
            if k >= args.warmup:
                times[name].append(dt)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"times": times, "losses": losses}, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap, micro_batch=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP's bucket_cap_mb")
    ap.add_argument("--compile", action="store_true",
                    help="also megalite with --overlap-grad-reduce --compile")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.json")
        start = loadavg()
        mp.spawn(worker, args=(2, os.path.join(tmp, "store"), args, out_path), nprocs=2)
        with open(out_path) as f:
            res = json.load(f)
    times, losses = res["times"], res["losses"]
    med = {n: statistics.median(t) for n, t in times.items()}

    def pair(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 4)

    def rel(a, b):
        return max(abs(x - y) / abs(y) for x, y in zip(a, b))

    tokens = args.global_batch * args.seq
    out = {"benchmark": "dp_step", "config": vars(args), "torch": torch.__version__,
           "loadavg_start": start, "loadavg_end": loadavg(),
           "step_s_median": {n: round(v, 4) for n, v in med.items()},
           "tokens_per_s": {n: round(tokens / v, 1) for n, v in med.items()},
           "ddp_over_overlap": round(med["ddp"] / med["overlap"], 4),
           "ddp_over_no_overlap": round(med["ddp"] / med["no_overlap"], 4),
           "no_overlap_over_overlap": round(med["no_overlap"] / med["overlap"], 4),
           "median_round_ratio": {"ddp/overlap": pair("ddp", "overlap"),
                                  "ddp/no_overlap": pair("ddp", "no_overlap"),
                                  "no_overlap/overlap": pair("no_overlap", "overlap")},
           "losses": {n: [round(x, 6) for x in v] for n, v in losses.items()},
           "megalite_overlap_bit_identical": losses["overlap"] == losses["no_overlap"],
           "ddp_max_rel_diff": rel(losses["ddp"], losses["overlap"]),
           "step_s_all": {n: [round(x, 4) for x in t] for n, t in times.items()}}
    if "compiled" in med:
        out.update({"ddp_over_compiled": round(med["ddp"] / med["compiled"], 4),
                    "overlap_over_compiled": round(med["overlap"] / med["compiled"], 4),
                    "compiled_max_rel_diff": rel(losses["compiled"], losses["overlap"])})
        out["median_round_ratio"].update({"ddp/compiled": pair("ddp", "compiled"),
                                          "overlap/compiled": pair("overlap", "compiled")})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
