"""megalite's training step (TP=PP=DP=1) against a minimal plain-PyTorch loop on the same batches.

    python benchmarks/train_step.py [--recipe both] [--layers 4] [--hidden 256] [--heads 8]
        [--groups 4] [--vocab 8192] [--seq 256] [--micro-batch 4] [--global-batch 4]
        [--warmup 3] [--steps 12] [--threads 2] [--profile N]

For each recipe (``llama``: RoPE, RMSNorm, SwiGLU, GQA, no biases, untied; ``classic``: learned
positions, LayerNorm, GELU, biases, tied) it builds

* megalite: ``Trainer(parse_train_args([...--mock-data...]))``, timed per ``train_step()`` (data,
  zero_grad, schedule forward/backward, grad sync, norm, clip, AdamW, the loss as a float);
* the baseline (``benchmarks/plain_pytorch_baseline.py``): its own ``torch.nn`` model of the same
  shapes, loaded with megalite's initial weights through the parameter-name mapping, the same
  mock-data samples in the same order, ``torch.optim.AdamW`` with the same hyper-parameters and
  weight-decay groups, ``clip_grad_norm_``, the same warmup + cosine learning rate; fp32.

Both live in one process with the same ``torch.set_num_threads``; steps are interleaved with
alternating order (A B, B A, ...) so drift in the machine's load hits both alike. The first
``--warmup`` steps of each are not timed. Per-step times -> medians, the ratio
megalite / baseline (and the median of the per-pair ratios, which cancels slow drift best),
tokens/s and MFU (model FLOPs from ``megalite.model.flops.flops_per_iteration``; the peak from
``megalite.training.metrics.device_peak_flops``: on CPU a measured 1024^3 fp32 matmul), and
this process's CPU time per step (``time.process_time``: on a shared, overloaded machine the wall
clock mostly measures waiting for a core; CPU time is the load-robust comparison, exact with
``--threads 1``; with more threads it also counts OpenMP workers' spinning).

Numerics: both train on the same batches from the same weights, so their losses must agree at
every step; the JSON reports the largest relative difference over the first 3 steps and over
all of them (fp32 re-association only: measured ~1e-7 to 2e-7 over 23 steps; the 1e-4 bound is
what the benchmark checks and reports as ``losses_agree``). ``--profile N`` then profiles N
more steps of each and prints, per operator, self CPU ms per step of both and the difference.

Prints one JSON object. Not a test: no assertion on time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_pytorch_baseline import (BaselineConfig, BaselineGPT, BaselineLoop,  # noqa: E402
                                    from_megalite_state_dict)

from megalite.model.flops import flops_per_iteration  # noqa: E402
from megalite.training.prepare import parse_train_args  # noqa: E402
from megalite.training.metrics import device_peak_flops, measure_matmul_flops  # noqa: E402
from megalite.training.trainer import Trainer  # noqa: E402

LOSS_RTOL = 1e-4


def megalite_argv(args, recipe: str, total_steps: int) -> list[str]:
    """``megalite train`` flags for this recipe and shape (mock data, no evaluation)."""
    argv = ["--mock-data", "--vocab-size", str(args.vocab), "--num-layers", str(args.layers),
            "--hidden-size", str(args.hidden), "--num-attention-heads", str(args.heads),
            "--seq-length", str(args.seq), "--max-position-embeddings", str(args.seq),
            "--ffn-hidden-size", str(ffn_size(args, recipe)),
            "--micro-batch-size", str(args.micro_batch),
            "--global-batch-size", str(args.global_batch), "--train-iters", str(total_steps),
            "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
            "--lr-warmup-iters", str(args.warmup), "--lr-decay-style", "cosine",
            "--weight-decay", str(args.weight_decay), "--clip-grad", str(args.clip),
            "--seed", str(args.seed), "--eval-iters", "0", "--log-interval", "1000000"]
    if recipe == "llama":
        argv += ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                 "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                 "--group-query-attention", "--num-query-groups", str(args.groups)]
    else:
        argv += ["--position-embedding-type", "learned_absolute", "--normalization",
                 "LayerNorm", "--activation", "gelu"]
    return argv


def ffn_size(args, recipe: str) -> int:
    if args.ffn:
        return args.ffn
    if recipe == "classic":
        return 4 * args.hidden
    return -(-int(8 * args.hidden / 3) // 64) * 64        # LLaMA's 8h/3, rounded up to 64


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def profile_compare(recipe: str, runners: dict, steps: int, rows: int) -> None:
    """Profile ``steps`` more steps of each runner (interleaved) and print to stderr, per
    operator, the self CPU milliseconds per step of each and their difference, largest
    differences first (where megalite spends time the baseline does not, or vice versa)."""
    from torch.profiler import ProfilerActivity, profile
    per_op = {name: {} for name in runners}
    for k in range(steps):
        for name in (list(runners) if k % 2 == 0 else list(runners)[::-1]):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runners[name]()
            for e in prof.key_averages():
                if e.key.startswith(("aten::", "autograd::", "Optimizer")) or "Backward" in e.key:
                    per_op[name][e.key] = per_op[name].get(e.key, 0.0) + e.self_cpu_time_total
    a, b = per_op["megalite"], per_op["baseline"]
    ops = sorted(set(a) | set(b), key=lambda op: -abs(a.get(op, 0.0) - b.get(op, 0.0)))
    print(f"\n=== {recipe}: self CPU ms per step over {steps} profiled steps each, "
          f"largest |megalite - baseline| first ===", file=sys.stderr)
    print(f"{'operator':60s} {'megalite':>9s} {'baseline':>9s} {'diff':>9s}", file=sys.stderr)
    for op in ops[:rows]:
        ma, mb = a.get(op, 0.0) / steps / 1e3, b.get(op, 0.0) / steps / 1e3
        print(f"{op[:60]:60s} {ma:9.1f} {mb:9.1f} {ma - mb:+9.1f}", file=sys.stderr)
    print(f"{'total (listed kinds)':60s} {sum(a.values()) / steps / 1e3:9.1f} "
          f"{sum(b.values()) / steps / 1e3:9.1f}", file=sys.stderr)


def run_recipe(args, recipe: str, peak: float) -> dict:
    total = args.warmup + args.steps + args.profile
    config = parse_train_args(megalite_argv(args, recipe, total))
    trainer = Trainer(config)
    (chunk,) = trainer.model_chunks
    m = config.model
    bcfg = BaselineConfig(recipe=recipe, num_layers=m.num_layers, hidden_size=m.hidden_size,
                          num_heads=m.num_attention_heads, num_kv_heads=m.query_groups,
                          ffn_size=m.ffn_size, vocab_size=m.vocab_size, seq_length=args.seq,
                          eps=m.layernorm_epsilon, rope_base=m.rotary_base)
    model = BaselineGPT(bcfg)
    model.load_state_dict(from_megalite_state_dict(chunk.full_state_dict(), bcfg), strict=True)
    o = config.optim
    base = BaselineLoop(model, trainer.train_data.dataset, micro=args.micro_batch,
                        global_batch=args.global_batch, lr=o.lr, min_lr=o.min_lr,
                        warmup=o.lr_warmup_iters, decay=config.training.train_iters,
                        weight_decay=o.weight_decay, betas=(o.adam_beta1, o.adam_beta2),
                        eps=o.adam_eps, clip=o.clip_grad)

    def mega_step() -> float:
        return trainer.train_step()[0]

    runners = {"megalite": mega_step, "baseline": base.step}
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    losses = {k: [] for k in runners}
    for k in range(args.warmup + args.steps):
        order = ("megalite", "baseline") if k % 2 == 0 else ("baseline", "megalite")
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            loss = runners[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            losses[name].append(loss)
            if k >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    if args.profile:
        profile_compare(recipe, runners, args.profile, args.profile_rows)

    tokens = args.global_batch * args.seq
    flops = flops_per_iteration(m, args.global_batch, args.seq)
    out = {"parameters": sum(p.numel() for p in chunk.parameters()),
           "model_flops_per_step": flops}
    for name in runners:
        med = statistics.median(times[name])
        out[name] = {"step_s_median": round(med, 4),
                     "step_s_min": round(min(times[name]), 4),
                     "tokens_per_s": round(tokens / med, 1),
                     "tflops": round(flops / med / 1e12, 5),
                     "mfu": round(flops / med / peak, 4),
                     "cpu_s_median": round(statistics.median(cpu[name]), 4),
                     "tokens_per_cpu_s": round(tokens / statistics.median(cpu[name]), 1),
                     "step_s_all": [round(t, 4) for t in times[name]]}
    pair = [a / b for a, b in zip(times["megalite"], times["baseline"])]
    out["ratio_of_medians"] = round(out["megalite"]["step_s_median"]
                                    / out["baseline"]["step_s_median"], 4)
    out["median_pair_ratio"] = round(statistics.median(pair), 4)
    out["cpu_ratio_of_medians"] = round(out["megalite"]["cpu_s_median"]
                                        / out["baseline"]["cpu_s_median"], 4)
    diffs = [rel(a, b) for a, b in zip(losses["megalite"], losses["baseline"])]
    out["losses"] = {"megalite": [round(x, 6) for x in losses["megalite"]],
                     "baseline": [round(x, 6) for x in losses["baseline"]],
                     "max_rel_diff_first_3": max(diffs[:3]),
                     "max_rel_diff_all": max(diffs),
                     "losses_agree": max(diffs) <= LOSS_RTOL}
    return out


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", choices=("llama", "classic", "both"), default="both")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4, help="key/value heads (llama recipe)")
    ap.add_argument("--ffn", type=int, default=None,
                    help="MLP width (default: 4h classic, 8h/3 rounded to 64 llama)")
    ap.add_argument("--vocab", type=int, default=8192,
                    help="a multiple of 128, so megalite's vocabulary padding is zero")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (also the LR warmup)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each loop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N more steps of each (per-operator table to stderr)")
    ap.add_argument("--profile-rows", type=int, default=25)
    args = ap.parse_args()
    if args.vocab % 128:
        ap.error("--vocab must be a multiple of 128 (megalite pads the vocabulary otherwise)")
    torch.set_num_threads(args.threads)
    peak, peak_source = device_peak_flops(torch.float32)
    out = {"benchmark": "train_step", "config": vars(args), "torch": torch.__version__,
           "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
           "threads": torch.get_num_threads(), "loadavg_start": loadavg(),
           "peak_flops": peak, "peak_source": peak_source, "recipes": {}}
    recipes = ("llama", "classic") if args.recipe == "both" else (args.recipe,)
    for recipe in recipes:
        out["recipes"][recipe] = run_recipe(args, recipe, peak)
    out["loadavg_end"] = loadavg()
    out["matmul_flops_end"] = measure_matmul_flops(torch.float32)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
