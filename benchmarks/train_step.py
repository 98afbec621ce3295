"""megalite's training step (TP=PP=DP=1) against a minimal plain-PyTorch loop on the same batches.

    python benchmarks/train_step.py [--recipe both] [--layers 4] [--hidden 256] [--heads 8]
        [--groups 4] [--vocab 8192] [--seq 256] [--micro-batch 4] [--global-batch 4]
        [--warmup 3] [--steps 12] [--threads 2] [--profile N] [--compile]

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

``--compile`` adds a third loop, megalite with ``--compile`` (a second Trainer from the same
flags: the same weights and batches), timed and profiled in the same interleaved rounds; its
first warmup step compiles. The JSON then has ``compiled_vs_baseline`` and
``compiled_vs_eager`` (step time ratios: below 1 the compiled step is faster), its losses
against the baseline's, and with ``--profile`` the self CPU ms per step of each loop by kind
(GEMM, attention, inductor's fused kernels, the remaining aten elementwise ops, optimizer,
autograd bookkeeping); inductor's kernels are named after the ops they fuse
(``cpp_fused_add_mean_mul_pow_rsqrt``: a residual add and an RMSNorm).

Prints one JSON object (the trainer's own lines go to stderr). Not a test: no assertion on time.
"""
from __future__ import annotations

import argparse
import contextlib
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


# Profiler rows counted: aten operators, autograd nodes, the optimizer, and (--compile, with
# inductor's kernel profiling on) the generated C++ kernels, named after the ops they fuse.
_PROFILED = ("aten::", "autograd::", "Optimizer", "graph_", "mkl", "mkldnn")


def profile_compare(recipe: str, runners: dict, steps: int, rows: int) -> dict:
    """Profile ``steps`` more steps of each runner (interleaved) and print to stderr, per
    operator, the self CPU milliseconds per step of each runner and the difference of the
    first two (megalite - baseline, or with --compile compiled - eager megalite), largest
    differences first. Returns {runner: {kind: ms per step}} over the kinds of
    :func:`op_kind`."""
    from torch.profiler import ProfilerActivity, profile
    per_op = {name: {} for name in runners}
    for k in range(steps):
        for name in (list(runners) if k % 2 == 0 else list(runners)[::-1]):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runners[name]()
            for e in prof.key_averages():
                if e.key.startswith(_PROFILED) or "Backward" in e.key:
                    per_op[name][e.key] = per_op[name].get(e.key, 0.0) + e.self_cpu_time_total
    names = list(runners)
    a, b = per_op[names[0]], per_op[names[1]]
    ops = sorted(set().union(*per_op.values()),
                 key=lambda op: -abs(a.get(op, 0.0) - b.get(op, 0.0)))
    print(f"\n=== {recipe}: self CPU ms per step over {steps} profiled steps each, "
          f"largest |{names[0]} - {names[1]}| first ===", file=sys.stderr)
    print(f"{'operator':60s} " + " ".join(f"{n[:9]:>9s}" for n in names) + f" {'diff':>9s}",
          file=sys.stderr)
    for op in ops[:rows]:
        ms = [per_op[n].get(op, 0.0) / steps / 1e3 for n in names]
        print(f"{op[:60]:60s} " + " ".join(f"{m:9.1f}" for m in ms) + f" {ms[0] - ms[1]:+9.1f}",
              file=sys.stderr)
    print(f"{'total (listed kinds)':60s} "
          + " ".join(f"{sum(per_op[n].values()) / steps / 1e3:9.1f}" for n in names),
          file=sys.stderr)
    kinds = {}
    for n in names:
        kinds[n] = {}
        for op, us in per_op[n].items():
            kind = op_kind(op)
            kinds[n][kind] = round(kinds[n].get(kind, 0.0) + us / steps / 1e3, 2)
    return kinds


def op_kind(op: str) -> str:
    """A profiler row's kind: "gemm", "attention", "fused (inductor)", "elementwise/other
    aten", "optimizer", or "autograd" (the nodes' own bookkeeping)."""
    if op.startswith("graph_") and "cpp_fused" in op:
        return "fused (inductor)"
    if any(k in op for k in ("::mm", "::addmm", "::bmm", "::linear", "::matmul", "mkl")):
        return "gemm"
    if "attention" in op or "flash" in op:
        return "attention"
    if op.startswith("Optimizer") or "_foreach" in op:
        return "optimizer"
    if op.startswith("aten::"):
        return "elementwise/other aten"
    return "autograd"


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
    model.to(trainer.device)   # a GPU when there is one, as megalite's
    o = config.optim
    base = BaselineLoop(model, trainer.train_data.dataset, micro=args.micro_batch,
                        global_batch=args.global_batch, lr=o.lr, min_lr=o.min_lr,
                        warmup=o.lr_warmup_iters, decay=config.training.train_iters,
                        weight_decay=o.weight_decay, betas=(o.adam_beta1, o.adam_beta2),
                        eps=o.adam_eps, clip=o.clip_grad)

    def mega_step() -> float:
        return trainer.train_step()[0]

    runners = {"megalite": mega_step, "baseline": base.step}
    if args.compile:   # megalite --compile first: the profile's difference is compiled - eager
        compiled = Trainer(parse_train_args(megalite_argv(args, recipe, total) + ["--compile"]))
        runners = {"compiled": lambda: compiled.train_step()[0], **runners}
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    losses = {k: [] for k in runners}
    for k in range(args.warmup + args.steps):
        order = list(runners) if k % 2 == 0 else list(runners)[::-1]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            loss = runners[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            losses[name].append(loss)
            if k >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    kinds = profile_compare(recipe, runners, args.profile, args.profile_rows) \
        if args.profile else None

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
    out.update(ratios(out, times, "megalite", "baseline"))
    if args.compile:   # time ratios (< 1: the first is faster); speedup = 1 / ratio
        out["compiled_vs_baseline"] = ratios(out, times, "compiled", "baseline")
        out["compiled_vs_eager"] = ratios(out, times, "compiled", "megalite")
    if kinds:
        out["profile_ms_per_step_by_kind"] = kinds
    out["losses"] = {name: [round(x, 6) for x in losses[name]] for name in runners}
    for name in runners:
        if name == "baseline":
            continue
        diffs = [rel(a, b) for a, b in zip(losses[name], losses["baseline"])]
        prefix = "" if name == "megalite" else f"{name}_"
        out["losses"].update({f"{prefix}max_rel_diff_first_3": max(diffs[:3]),
                              f"{prefix}max_rel_diff_all": max(diffs),
                              f"{prefix}losses_agree": max(diffs) <= LOSS_RTOL})
    return out


def ratios(out: dict, times: dict, a: str, b: str) -> dict:
    """Step time of ``a`` over ``b``: ratio of the wall medians, median of the per-pair
    ratios (the steps were interleaved), ratio of the CPU-time medians."""
    pair = [x / y for x, y in zip(times[a], times[b])]
    return {"ratio_of_medians": round(out[a]["step_s_median"] / out[b]["step_s_median"], 4),
            "median_pair_ratio": round(statistics.median(pair), 4),
            "cpu_ratio_of_medians": round(out[a]["cpu_s_median"] / out[b]["cpu_s_median"], 4)}


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
    ap.add_argument("--compile", action="store_true",
                    help="also megalite --compile (timed and profiled with the other two; "
                         "its first --warmup step compiles)")
    args = ap.parse_args()
    if args.vocab % 128:
        ap.error("--vocab must be a multiple of 128 (megalite pads the vocabulary otherwise)")
    torch.set_num_threads(args.threads)
    if args.compile and args.profile:   # name inductor's kernels in the profile
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True
    peak, peak_source = device_peak_flops(torch.float32)
    out = {"benchmark": "train_step", "config": vars(args), "torch": torch.__version__,
           "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
           "threads": torch.get_num_threads(), "loadavg_start": loadavg(),
           "peak_flops": peak, "peak_source": peak_source, "recipes": {}}
    recipes = ("llama", "classic") if args.recipe == "both" else (args.recipe,)
    for recipe in recipes:
        # stdout carries only the JSON: the trainer's lines (--compile's timing) go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            out["recipes"][recipe] = run_recipe(args, recipe, peak)
    out["loadavg_end"] = loadavg()
    out["matmul_flops_end"] = measure_matmul_flops(torch.float32)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
