"""megalite's first-GPU check: throughput and MFU, compiled and eager, peak memory against the
``--dry-run`` plan, Hugging Face logit parity in bf16 and fp32, and which SDPA kernel runs.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json   # one GPU, < 5 min
    PYTHONPATH=. python3 benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.json   # tiny smoke

Phases, cheapest first, each in its own try/except (an error is recorded and the next phase
runs); the JSON is printed at the end and rewritten to ``--out`` when each phase starts and
ends, so a run killed by a timeout leaves what it measured and names the phase it was in:

* ``env``: torch, CUDA, device, transformers, the TF32 switches.
* ``sdpa``: ``F.scaled_dot_product_attention`` on the model's attention shape (megalite's
  layout: [b, a, s, d] views of [s, b, a, d], causal, ``enable_gqa`` as the model calls it),
  forward + backward, under ``torch.nn.attention.sdpa_kernel`` for each backend (flash,
  efficient, cudnn, math; one that refuses the shape records its error), and with no
  restriction: which backend that default picked (the aten op the profiler saw) and its time.
* ``parity``: a 2-layer LLaMA of the run's width (``--parity-layers``), megalite's
  ``GPTModel`` initialised with std 1/sqrt(h) (logits of order 1; 0.022 at h=2048, about the
  preset's 0.02), converted with megalite's converter (``megalite.convert.to_hf``) into
  ``transformers.LlamaForCausalLM`` (eager attention: an independent implementation), logits
  compared through ``hf_models.verify_logits`` on the device, first fp32 then both models
  cast to bf16. Tolerances: fp32 ``FP32_TOL``; bf16 relative to the bf16 noise floor.
* ``train_eager`` / ``train_compiled``: ``Trainer.train_step`` (data, forward/backward over
  the microbatches, grad sync, norm, clip, AdamW) of the preset (``1b``: TinyLlama-1.1B's
  shape) at ``--seq-length`` 4096, ``--bf16``, ``--mock-data``, TP=PP=DP=1, ``--compile`` in
  the compiled phase (or ``{"skipped": ...}``). ``--warmup`` untimed steps (the first one's
  time, compilation included, is reported), then ``--steps`` steps between two
  ``torch.cuda.synchronize`` calls. Tokens/s, TFLOP/s and MFU from megalite's FLOPs formula
  and ``throughput_metrics`` against ``--peak-tflops`` (989: H100/H200 SXM dense bf16). Peak
  memory (``max_memory_allocated``, reset after the build) against the ``--dry-run`` plan
  and its note on the s x s attention scores. One profiled step names the SDPA op. Then
  ``--steps`` iterations of megalite's own loop (``Trainer.train``: each iteration's loss and
  stop votes read one iteration late), timed whole: ``train_step_over_loop`` is the step time
  above (read at once) over the loop's.

``--bf16``: bf16 parameters (no autocast), fp32 masters and gradient accumulators; parity
casts both models to bf16 the same way. No ``.item()`` here inside a timed step. Needs no
DeepSpeed, megatron-core, sentencex or ``megalite._C`` (tests/unit/test_gpu_check.py runs
``--cpu`` with those unimportable); no network. No assertion on time.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings

import torch   # (no CUDA call before main() has read --cpu)

PEAK_TFLOPS = 989.0
FP32_TOL = 1e-3
"""fp32 logits (order 1) of two implementations of the same 2-layer model: summation order
and kernels differ, so ~1e-5 is expected; a mapping error (a swapped head, a transposed
matrix) moves them by ~1e-1. TF32 is switched off for this comparison."""
BF16_FLOOR_FACTOR = 3.0
"""bf16: megalite's and HF's logits, both cast to bf16, may differ by up to 3x HF's own
distance from the fp32 logits (two bf16 implementations each that far from the fp32 result
differ by at most about twice it; 3x leaves room for rounding at different places)."""

GPU_DEFAULTS = dict(preset="1b", seq_length=4096, micro_batch_size=1, global_batch_size=8,
                    warmup=2, steps=5, parity_seq=4096, parity_batch=1, sdpa_iters=10,
                    budget_s=270.0)
CPU_DEFAULTS = dict(preset="tiny-llama", seq_length=64, micro_batch_size=2, global_batch_size=4,
                    warmup=1, steps=2, parity_seq=64, parity_batch=2, sdpa_iters=2,
                    budget_s=900.0)
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


class Interrupted(BaseException):
    """SIGTERM/SIGINT (e.g. from ``timeout``): stop, keeping what was measured."""


def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def progress(start: float, msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')} +{time.perf_counter() - start:6.1f}s] "
          f"{msg}", file=sys.stderr, flush=True)


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory(dev) -> None:
    """Drop what the last phase left (its objects are gone by now) and reset the peak."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


class Report:
    """The JSON document, rewritten to ``path`` (temporary name, then renamed) on each change."""

    def __init__(self, path: str | None, args: argparse.Namespace, start: float):
        self.path, self.start = path, start
        self.data = {"benchmark": "gpu_check", "mode": "cpu" if args.cpu else "gpu",
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args),
                     "phases": {}, "summary": {}}

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        if not self.path:
            return
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def run(self, name: str, fn, dev, budget_s: float) -> dict:
        phases = self.data["phases"]
        if time.perf_counter() - self.start > budget_s:
            phases[name] = {"status": "skipped", "skipped": f"time budget --budget-s "
                            f"{budget_s:g} spent before this phase"}
            self.write()
            progress(self.start, f"{name}: skipped (time budget)")
            return phases[name]
        progress(self.start, f"{name}: start")
        phases[name] = {"status": "running"}
        self.write()
        t0 = time.perf_counter()
        try:
            result = fn()
            result.setdefault("status", "skipped" if "skipped" in result else "ok")
        except Interrupted as e:
            phases[name] = {"status": "interrupted", "signal": str(e),
                            "seconds": round(time.perf_counter() - t0, 2)}
            self.write()
            raise
        except Exception as e:   # noqa: BLE001 -- record it and go on with the next phase
            result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
        free_memory(dev)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        phases[name] = result
        self.write()
        progress(self.start, f"{name}: {result['status']} in {result['seconds']:.1f}s"
                 + (f" ({result['error'].splitlines()[0][:200]})" if "error" in result else ""))
        return result


# -- phases ----------------------------------------------------------------------------------------
def phase_env(dev) -> dict:
    import numpy
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__, "transformers": transformers.__version__,
           "device": str(dev), "cuda_available": torch.cuda.is_available(),
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "megalite_bf16": "bf16 parameters (no autocast), fp32 master weights and grads"}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1),
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    else:
        out.update(threads=torch.get_num_threads(), machine=platform.machine())
    return out


def _model_config(args):
    from megalite.model import get_preset
    return get_preset(args.preset).replace(
        max_position_embeddings=max(args.seq_length, args.parity_seq), seq_length=args.seq_length)


def sdpa_ops(prof) -> dict[str, int]:
    """{aten SDPA kernel op name: calls} seen by a ``torch.profiler`` run."""
    ops: dict[str, int] = {}
    for ev in prof.key_averages():
        if "_scaled_dot_product" in ev.key:
            ops[ev.key] = ops.get(ev.key, 0) + ev.count
    return ops


def backend_of(ops) -> str | None:
    """The SDPA backend behind the forward kernel op names in ``ops``."""
    for op in ops:
        if op.endswith("_backward"):
            continue
        for key in ("cudnn", "efficient", "flash", "math", "overrideable"):
            if key in op:
                return key
    return None


def phase_sdpa(args, dev) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    c = _model_config(args)
    b, a, g, d, s = args.micro_batch_size, c.num_attention_heads, c.query_groups, c.head_dim, \
        args.seq_length
    gen = torch.Generator(device=dev).manual_seed(0)

    def make(n):   # megalite's layout: [s, b, n, d] permuted to [b, n, s, d] (a view)
        return torch.randn(s, b, n, d, device=dev, dtype=torch.bfloat16, generator=gen
                           ).permute(1, 2, 0, 3).requires_grad_()
    q, k, v = make(a), make(g), make(g)
    grad = torch.randn(b, a, s, d, device=dev, dtype=torch.bfloat16, generator=gen)
    gqa = a != g

    def step(kk, vv, enable_gqa):   # forward + backward, no gradient accumulation
        out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=enable_gqa)
        torch.autograd.grad(out, (q, kk, vv), grad)

    def timed(kk, vv, enable_gqa, backend) -> dict:
        ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        with ctx, warnings.catch_warnings(record=True) as caught:   # why a kernel refused
            warnings.simplefilter("always")
            try:
                for _ in range(2):                                   # warm-up
                    step(kk, vv, enable_gqa)
                sync(dev)
                t0 = time.perf_counter()
                for _ in range(args.sdpa_iters):
                    step(kk, vv, enable_gqa)
                sync(dev)
                ms = (time.perf_counter() - t0) / args.sdpa_iters * 1e3
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                            ) as p:
                    step(kk, vv, enable_gqa)
                    sync(dev)
            except Exception as e:   # noqa: BLE001 -- a backend that refuses this shape
                return {"error": f"{type(e).__name__}: {str(e)[:300]}",
                        "warnings": [str(w.message)[:400] for w in caught[:6]]}
        ops = sdpa_ops(p)
        return {"fwd_bwd_ms": round(ms, 3), "backend": backend_of(ops), "ops": ops}

    out = {"shape": {"batch": b, "heads": a, "kv_groups": g, "seq": s, "head_dim": d,
                     "dtype": "bfloat16", "is_causal": True, "enable_gqa": gqa},
           "backends": {}}
    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    for name in ("default",) + SDPA_BACKENDS:
        out["backends"][name] = timed(k, v, gqa, kinds.get(name))
    out["default_backend"] = out["backends"]["default"].get("backend")
    if gqa:   # the same attention with keys/values repeated per query head (no enable_gqa)
        kk, vv = (t.detach().repeat_interleave(a // g, dim=1).requires_grad_() for t in (k, v))
        out["default_without_gqa"] = timed(kk, vv, False, None)
    return out


def phase_parity(args, dev) -> dict:
    from transformers import LlamaForCausalLM

    from megalite.convert import config_to_hf, hf_models, to_hf
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext

    base = _model_config(args)
    cfg = base.replace(num_layers=args.parity_layers,
                       init_method_std=1.0 / math.sqrt(base.hidden_size))
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")      # no TF32 in the fp32 comparison
    try:
        ours = GPTModel(cfg, ModelContext(ParallelState.single(), device=dev)).eval()
        ours.init_weights(seed=1234)
        hf_cfg = config_to_hf(cfg)
        hf_cfg._attn_implementation = "eager"           # an independent attention
        with torch.device(dev):
            hf = LlamaForCausalLM(hf_cfg).eval()
        hf.load_state_dict(to_hf(ours.full_state_dict(), cfg), strict=True)
        ids = torch.randint(0, cfg.vocab_size, (args.parity_batch, args.parity_seq),
                            generator=torch.Generator().manual_seed(5)).to(dev)
        out = {"model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size,
                         "heads": cfg.num_attention_heads, "kv_groups": cfg.query_groups,
                         "ffn": cfg.ffn_size, "vocab": cfg.vocab_size,
                         "init_std": round(cfg.init_method_std, 5)},
               "tokens": [args.parity_batch, args.parity_seq], "hf_attention": "eager"}
        with torch.no_grad():
            mine, ref = hf_models.verify_logits(ours, hf, ids, cfg)
            fp32 = (mine - ref).abs().max().item()
            out["fp32"] = {"max_abs_diff": fp32, "max_abs_logit": ref.abs().max().item(),
                           "tol": FP32_TOL, "ok": fp32 <= FP32_TOL}
            del mine
            ours.to(torch.bfloat16)         # as the trainer casts its chunks under --bf16
            for p in hf.parameters():       # as from_pretrained(dtype=bf16): the rotary
                p.data = p.data.to(torch.bfloat16)   # inv_freq buffer stays fp32
            mine16, hf16 = hf_models.verify_logits(ours, hf, ids, cfg)
            diff = (mine16 - hf16).abs().max().item()
            hf_err = (hf16 - ref).abs().max().item()
            ours_err = (mine16 - ref).abs().max().item()
        tol = BF16_FLOOR_FACTOR * hf_err
        out["bf16"] = {"max_abs_diff": diff, "hf_bf16_vs_fp32": hf_err,
                       "megalite_bf16_vs_fp32": ours_err, "tol": tol, "ok": diff <= tol,
                       "params_dtype": "bfloat16 (parameters cast, no autocast)"}
        out["ok"] = out["fp32"]["ok"] and out["bf16"]["ok"]
        return out
    finally:
        torch.set_float32_matmul_precision(old_precision)


def compile_available() -> bool:
    """Whether ``megalite train`` has a ``--compile`` option (issue 16 adds it)."""
    from megalite.train_args import build_parser
    return "--compile" in build_parser()._option_string_actions


def train_argv(args, compiled: bool) -> list[str]:
    # + 1: the profiled step; + steps: megalite's own loop (phase_train)
    iters = args.warmup + 2 * args.steps + 1
    argv = ["--model-preset", args.preset, "--bf16", "--mock-data",
            "--seq-length", str(args.seq_length),
            "--max-position-embeddings", str(max(args.seq_length, args.parity_seq)),
            "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(iters),
            "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "1",
            "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--seed", "1234", "--eval-iters", "0", "--log-interval", "1000000"]
    return argv + (["--compile"] if compiled else [])


def memory_plan(config) -> dict:
    """The ``--dry-run`` planner's per-rank estimate (GiB) for this device, and its note on
    whether it counts the s x s attention scores (only where the math backend keeps them)."""
    from megalite.training.dry_run import GIB, plan_run
    plan = plan_run(config, 1, check_data=False)
    mem = plan.stages[0].memory_bytes
    return {"estimate_gib": round(mem["total"] / GIB, 3),
            "estimate_parts_gib": {k: round(v / GIB, 3) for k, v in mem.items()
                                   if k != "total"},
            "attention_scores": plan.attention_scores}


def phase_train(args, dev, compiled: bool) -> dict:
    from megalite.training.metrics import peak_memory_gib, throughput_metrics
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import Trainer
    if compiled and not compile_available():
        return {"skipped": "--compile not available"}
    argv = train_argv(args, compiled)
    config = parse_train_args(argv)
    t0 = time.perf_counter()
    trainer = Trainer(config)
    sync(dev)
    build_s = time.perf_counter() - t0
    free_memory(dev)                   # the steps' peak, with every persistent tensor counted
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        sync(dev)
        t = time.perf_counter()
        loss, _ = trainer.train_step()   # megalite's step returns the loss as a float
        sync(dev)
        times.append(time.perf_counter() - t)
        losses.append(loss)
    peak = peak_memory_gib(dev)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step()
        sync(dev)
    # megalite's own loop (Trainer.train) over --steps more iterations: it reads each
    # iteration's loss and stop votes one iteration late, against the per-step reads above
    sync(dev)
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):   # its one log line, not into the JSON
        loop = trainer.train()
    sync(dev)
    loop_s = (time.perf_counter() - t) / args.steps
    timed = times[args.warmup:]
    step_s = sum(timed) / len(timed)
    tokens = trainer.global_batch_size * trainer.seq_length
    rates = throughput_metrics(trainer.flops_per_iter, tokens, step_s, 1, args.peak_tflops * 1e12)
    ops = sdpa_ops(prof)
    out = {"argv": argv, "parameters": sum(p.numel() for c in trainer.model_chunks
                                           for p in c.parameters()),
           "param_dtype": str(next(trainer.model_chunks[0].parameters()).dtype),
           "tokens_per_step": tokens, "model_flops_per_step": trainer.flops_per_iter,
           "build_s": round(build_s, 2), "first_step_s": round(times[0], 3),
           "warmup_steps_s": [round(x, 3) for x in times[:args.warmup]],
           "step_s_mean": round(step_s, 4), "step_s_median": round(statistics.median(timed), 4),
           "step_s_all": [round(x, 4) for x in timed],
           "tokens_per_s": round(rates["tokens_per_s"], 1),
           "tflops": _sig(rates["tflops_per_device"]), "mfu": _sig(rates["mfu"]),
           "peak_tflops": args.peak_tflops, "losses": [round(x, 5) for x in losses],
           "ln_vocab": round(math.log(config.model.vocab_size), 4),
           "loop_step_s_mean": round(loop_s, 4), "train_step_over_loop": round(step_s / loop_s, 4),
           "loop_losses": [round(x, 5) for x in loop.losses],
           "sdpa_ops": ops, "sdpa_backend": backend_of(ops)}
    mem = memory_plan(trainer.config)
    mem["peak_gib"] = round(peak, 3)
    mem["peak_kind"] = ("torch.cuda.max_memory_allocated" if dev.type == "cuda"
                        else "process peak RSS (CPU; includes Python and libraries)")
    if dev.type == "cuda":   # and what the caching allocator held
        mem["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / 2 ** 30, 3)
    mem["peak_over_estimate"] = round(peak / mem["estimate_gib"], 3)
    out["memory"] = mem
    del trainer, prof
    if compiled:
        torch._dynamo.reset()
    return out


def summarize(report: Report) -> None:
    ph, s = report.data["phases"], report.data["summary"]
    eager, comp = ph.get("train_eager", {}), ph.get("train_compiled", {})
    for name, r in (("eager", eager), ("compiled", comp)):
        if r.get("status") == "ok":
            s[name] = {k: r[k] for k in ("tokens_per_s", "tflops", "mfu", "step_s_mean",
                                         "train_step_over_loop")}
            s[name]["peak_gib"] = r["memory"]["peak_gib"]
            s[name]["dry_run_estimate_gib"] = r["memory"]["estimate_gib"]
    if eager.get("status") == "ok" and comp.get("status") == "ok":
        s["compiled_speedup"] = round(eager["step_s_mean"] / comp["step_s_mean"], 3)
        s["compiled_vs_eager_max_loss_diff"] = max(
            abs(x - y) for x, y in zip(eager["losses"], comp["losses"]))
    elif comp.get("status") == "skipped":
        s["compiled"] = comp.get("skipped")
    par = ph.get("parity", {})
    if par.get("status") == "ok":
        s["parity_ok"] = par["ok"]
        s["parity_fp32_max_abs_diff"] = par["fp32"]["max_abs_diff"]
        s["parity_bf16_max_abs_diff"] = par["bf16"]["max_abs_diff"]
    if ph.get("sdpa", {}).get("status") == "ok":
        s["sdpa_default_backend"] = ph["sdpa"]["default_backend"]
    if eager.get("status") == "ok":
        s["sdpa_backend_in_model"] = eager["sdpa_backend"]
    s["phase_status"] = {k: v.get("status") for k, v in ph.items()}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="smoke mode: tiny model on the CPU")
    ap.add_argument("--out", help="write the JSON here too (rewritten after every phase)")
    ap.add_argument("--preset", help="megalite model preset (GPU: 1b; --cpu: tiny-llama)")
    for name in ("seq-length", "micro-batch-size", "global-batch-size", "warmup", "steps",
                 "parity-seq", "parity-batch", "sdpa-iters"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--parity-layers", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                    help="dense bf16 peak for MFU (989: H100/H200 SXM)")
    ap.add_argument("--budget-s", type=float, help="skip phases that would start after this "
                    "many seconds (GPU: 270; --cpu: 900)")
    ap.add_argument("--phases", default="env,sdpa,parity,train_eager,train_compiled",
                    help="comma-separated subset, in this order")
    args = ap.parse_args(argv)
    for k, v in (CPU_DEFAULTS if args.cpu else GPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""     # before torch touches CUDA
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    start = time.perf_counter()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the CPU smoke mode)", file=sys.stderr)
        return 2
    dev = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    report = Report(args.out, args, start)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    phases = {"env": lambda: phase_env(dev), "sdpa": lambda: phase_sdpa(args, dev),
              "parity": lambda: phase_parity(args, dev),
              "train_eager": lambda: phase_train(args, dev, compiled=False),
              "train_compiled": lambda: phase_train(args, dev, compiled=True)}
    wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(phases))
    if unknown:
        print(f"gpu_check: --phases: unknown {unknown} (known: {', '.join(phases)})",
              file=sys.stderr)
        return 2
    rc = 0
    try:
        for name in phases:
            if name in wanted:
                report.run(name, phases[name], dev, args.budget_s)
    except Interrupted as e:
        report.data["interrupted"] = str(e)
        rc = 143 if str(e) == "SIGTERM" else 130
    summarize(report)
    report.write()
    print(json.dumps(report.data, indent=1, default=str), flush=True)
    progress(start, f"done (JSON {'also in ' + args.out if args.out else 'above'}); summary "
             + json.dumps(report.data["summary"], default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
