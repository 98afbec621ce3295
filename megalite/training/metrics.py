"""Training metrics: device peak FLOP/s (for MFU), peak memory, and the logger.

MFU (model FLOPs utilisation) = achieved model FLOP/s per device / the device's peak FLOP/s, with
the model FLOPs of :mod:`megalite.model.flops` (no recompute counted). The peak comes from, in
order: ``--peak-tflops``; a table of common accelerators (dense tensor-core peaks from the vendors'
datasheets, by the parameter dtype: bf16, fp16, and for fp32 the TF32 peak when PyTorch lets
matmuls use TF32, else the plain FP32 peak); otherwise (CPU, or an accelerator not in the table)
the *measured* speed of a large matmul in that dtype on that device, the best of repeated runs
for about a quarter of a second, cached per process. On CPU the measurement uses the threads the
process has (``torch.get_num_threads()``), under whatever load other processes put on the cores
at that moment: it is an estimate of what this process can get, not a datasheet figure.

Peak memory (``peak_memory_gib``): on CUDA ``torch.cuda.max_memory_allocated`` (tensors only,
not the caching allocator's reserve); on CPU the process's peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``: everything, Python and libraries included).
``peak_memory_kind`` says which.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time

import torch

from megalite.errors import MegaliteError

# Dense peaks in TFLOP/s; checked in order, first name match wins (regex on the device name).
_GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"H200 NVL", dict(bf16=835.5, fp16=835.5, tf32=417.8, fp32=60.0)),
    (r"H200|GH200", dict(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),
    (r"H100 NVL", dict(bf16=835.5, fp16=835.5, tf32=417.8, fp32=60.0)),
    (r"H100.*PCIe", dict(bf16=756.5, fp16=756.5, tf32=378.0, fp32=51.2)),
    (r"H100|H800", dict(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),
    (r"B200", dict(bf16=2250.0, fp16=2250.0, tf32=1100.0)),
    (r"A100|A800", dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),
    (r"L40S", dict(bf16=362.1, fp16=362.1, tf32=183.0, fp32=91.6)),
    (r"\bL4\b", dict(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (r"V100", dict(fp16=125.0, fp32=15.7)),
    (r"\bT4\b", dict(fp16=65.0, fp32=8.1)),
    (r"MI300X", dict(bf16=1307.4, fp16=1307.4, tf32=653.7, fp32=163.4)),
]

_MEASURED: dict[tuple[str, torch.dtype], tuple[float, str]] = {}


def table_peak_tflops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Datasheet dense peak TFLOP/s of ``device_name`` for ``dtype`` (None if not in the table).
    ``tf32``: fp32 matmuls may use TF32 tensor cores."""
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "tf32" if tf32 else "fp32")
    for pattern, peaks in _GPU_PEAKS:
        if re.search(pattern, device_name):
            return peaks.get(key)
    return None


def measure_matmul_flops(dtype: torch.dtype, device: torch.device | str = "cpu",
                         seconds: float = 0.25) -> float:
    """Best FLOP/s of an n x n @ n x n matmul (n = 1024 on CPU, 8192 on accelerators) in
    ``dtype`` over about ``seconds`` of repeats (at least two timed runs after a warm-up)."""
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    # its own generator: the measurement (at a run's first log) must not move the training's
    # random streams, or a resumed run would draw other dropout masks than an unbroken one
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    sync()
    best, start, runs = math.inf, time.perf_counter(), 0
    while runs < 2 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2.0 * n ** 3 / best


def device_peak_flops(dtype: torch.dtype, override_tflops: float | None = None,
                      device: torch.device | str | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device for ``dtype``, where the figure comes from).

    ``device`` defaults to the current CUDA device if there is one, else the CPU. See the
    module docstring for the order (override, table, measurement)."""
    if override_tflops is not None:
        if not override_tflops > 0:
            raise MegaliteError(f"--peak-tflops must be > 0, got {override_tflops}")
        return override_tflops * 1e12, f"--peak-tflops {override_tflops}"
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        tflops = table_peak_tflops(name, dtype, tf32)
        if tflops is not None:
            kind = "tf32" if dtype == torch.float32 and tf32 else str(dtype).replace("torch.", "")
            return tflops * 1e12, f"table: {name}, dense {kind}"
    key = (str(device), dtype)
    if key not in _MEASURED:
        flops = measure_matmul_flops(dtype, device)
        n = 1024 if device.type == "cpu" else 8192
        _MEASURED[key] = (flops, f"measured: {n}x{n} {str(dtype).replace('torch.', '')} matmul "
                                 f"on {device} ({torch.get_num_threads()} threads)"
                          if device.type == "cpu" else
                          f"measured: {n}x{n} {str(dtype).replace('torch.', '')} matmul on "
                          f"{torch.cuda.get_device_name(device)}")
    return _MEASURED[key]


def peak_memory_kind(device: torch.device | str | None = None) -> str:
    """"cuda_max_allocated" or "process_peak_rss" (what peak_memory_gib measures)."""
    device = torch.device(device) if device is not None else None
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "cuda_max_allocated" if on_cuda else "process_peak_rss"


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak memory in GiB (see the module docstring and peak_memory_kind)."""
    if peak_memory_kind(device) == "cuda_max_allocated":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20  # bytes / KiB


def throughput_metrics(flops_per_iteration: float, tokens_per_iteration: int,
                       iteration_time_s: float, num_devices: int,
                       peak_flops: float) -> dict[str, float]:
    """tokens_per_s (whole job), tflops_per_device and mfu (fraction, not percent) of an
    iteration of the whole job that took ``iteration_time_s`` on ``num_devices`` devices."""
    if not iteration_time_s > 0 or num_devices < 1 or not peak_flops > 0:
        raise MegaliteError(f"throughput_metrics: iteration_time_s={iteration_time_s}, "
                            f"num_devices={num_devices}, peak_flops={peak_flops} must be > 0")
    per_device = flops_per_iteration / iteration_time_s / num_devices
    return {"tokens_per_s": tokens_per_iteration / iteration_time_s,
            "tflops_per_device": per_device / 1e12, "mfu": per_device / peak_flops}


# (key, console label, format); the console line shows the keys present, in this order.
_CONSOLE = [
    ("consumed_samples", "consumed samples", "{:.0f}"),
    ("lr", "lr", "{:.3E}"),
    ("loss", "loss", "{:.6f}"),
    ("moe_aux_loss", "moe aux loss", "{:.4E}"),
    ("moe_z_loss", "moe z loss", "{:.4E}"),
    ("moe_max_load", "moe max load", "{:.3f}"),
    ("grad_norm", "grad norm", "{:.4f}"),
    ("loss_scale", "loss scale", "{:.1f}"),
    ("skipped_iters", "skipped", "{:.0f}"),
    ("iteration_time_s", "time/iter (ms)", None),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("tflops_per_device", "TFLOP/s/device", "{:.3f}"),
    ("mfu", "MFU", None),
    ("peak_memory_gib", "peak mem (GiB)", "{:.3f}"),
]
_SPLIT_NAMES = {"valid": "validation", "validation": "validation", "test": "test"}


def _json_value(v):
    """Floats that JSON cannot hold (nan, inf) become null; tensors/numpy scalars plain."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def format_train_line(iteration: int, metrics: dict, train_iters: int | None = None) -> str:
    """Megatron-style one-line summary of ``metrics`` (keys as in MetricsLogger.log_train)."""
    total = train_iters if train_iters is not None else metrics.get("train_iters")
    parts = [f" iteration {iteration:>8d}" + (f"/{int(total):>8d}" if total else "")]
    for key, label, fmt in _CONSOLE:
        if key not in metrics or metrics[key] is None:
            continue
        v = float(metrics[key])
        if key == "iteration_time_s":
            text = f"{v * 1e3:.1f}"
        elif key == "mfu":
            text = f"{v * 100:.2f}%"
        else:
            text = fmt.format(v)
        parts.append(f"{label}: {text}")
    return " | ".join(parts)


class MetricsLogger:
    """Console + JSON lines (``log_json``) + TensorBoard (``tensorboard_dir``) + Weights &
    Biases (``wandb``: ``wandb.init`` keywords, megalite.training.wandb_log) for one rank.

    Create it on every rank with ``enabled`` true on the one rank that logs; elsewhere every
    method does nothing and no file is opened. The JSON-lines file is appended to (a resumed
    run continues it); each record is one ``write`` of one line, flushed at once, with
    ``"split"`` ("train", "valid", "test"), ``"iteration"`` and ``"time"`` (Unix seconds);
    nan/inf become null. TensorBoard scalars are ``train/<key>`` and ``<split>/loss``,
    ``<split>/ppl`` at step = iteration; W&B gets the same.
    """

    def __init__(self, *, enabled: bool, log_json: str | None = None,
                 tensorboard_dir: str | None = None, train_iters: int | None = None,
                 stream=None, wandb: dict | None = None):
        self.enabled, self.train_iters = enabled, train_iters
        self._stream = stream
        self._json = self._tb = self._wandb = None
        if not enabled:
            return
        if wandb:
            from megalite.training.wandb_log import WandbWriter
            self._wandb = WandbWriter(wandb)
        if log_json:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(log_json)), exist_ok=True)
                self._json = open(log_json, "a", encoding="utf-8")
            except OSError as e:
                raise MegaliteError(f"--log-json {log_json}: cannot open ({e.strerror})") from None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MegaliteError(f"--tensorboard-dir needs the tensorboard package "
                                    f"(pip install tensorboard): {e}") from None
            try:
                self._tb = SummaryWriter(log_dir=tensorboard_dir)
            except OSError as e:
                raise MegaliteError(f"--tensorboard-dir {tensorboard_dir}: cannot write "
                                    f"({e.strerror or e})") from None

    def _print(self, line: str) -> None:
        print(line, file=self._stream or sys.stdout, flush=True)

    def _write_json(self, record: dict) -> None:
        if self._json is not None:
            record = {k: _json_value(v) for k, v in record.items()}
            self._json.write(json.dumps(record, allow_nan=False) + "\n")
            self._json.flush()

    def log_train(self, iteration: int, metrics: dict[str, float]) -> None:
        """Log one training interval: the console line, a JSON record, TensorBoard scalars.
        Expected keys: iteration, consumed_samples, loss, lr, grad_norm, loss_scale,
        skipped_iters, iteration_time_s, tokens_per_s, tflops_per_device, mfu (a fraction),
        peak_memory_gib; others are written to JSON and TensorBoard too."""
        if not self.enabled:
            return
        self._print(format_train_line(iteration, metrics, self.train_iters))
        self._write_json({"split": "train", **metrics, "iteration": iteration,
                          "time": time.time()})
        scalars = {}
        for key, value in metrics.items():
            v = value.item() if hasattr(value, "item") else value
            if key not in ("iteration", "train_iters") and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                scalars[f"train/{key}"] = float(v)
            elif isinstance(v, list):   # e.g. moe_expert_tokens: one scalar per entry
                scalars.update({f"train/{key}/{j}": float(x) for j, x in enumerate(v)})
        self._scalars(scalars, iteration)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step`` to TensorBoard and W&B (those that are open)."""
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step)

    def log_eval(self, iteration: int, split: str, loss: float) -> None:
        """Log an evaluation: ``split`` ("valid" or "test") loss and perplexity exp(loss)."""
        if not self.enabled:
            return
        loss = float(loss)
        ppl = math.exp(loss) if loss < 709.0 else math.inf  # nan stays nan
        name = _SPLIT_NAMES.get(split, split)
        self._print(f" {name} loss at iteration {iteration} | lm loss: {loss:.6f} | "
                    f"lm loss PPL: {ppl:.4f}")
        self._write_json({"split": split, "iteration": iteration, "loss": loss, "ppl": ppl,
                          "time": time.time()})
        self._scalars({f"{split}/loss": loss, f"{split}/ppl": ppl}, iteration)

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._json is not None:
            self._json.close()
            self._json = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
