"""Streaming conversion of a synthetic LLaMA-2-7B checkpoint: time and peak memory.

1. Writes a synthetic megalite checkpoint of the ``llama2-7b`` preset (6.74 B parameters, bf16,
   13.5 GB) for a TP x PP layout (default TP=2 x PP=2), tensor by tensor (random N(0, 0.02)
   weights; no download).
2. Runs ``megalite convert to-hf`` on it in a child process, then (``--directions``)
   ``megalite convert from-hf`` of the result back into TP x PP, each timed, while the child's
   ``/proc/PID/status`` is sampled every 0.1 s: peak VmRSS, peak RssAnon (memory the process
   itself allocated) and peak RssFile (memory-mapped checkpoint pages: clean page cache mapped
   into the process, which the kernel reclaims under pressure).
3. Prints one JSON object; deletes everything it wrote unless ``--keep``.

    python benchmarks/convert_7b.py --workdir /work/bench_convert_7b
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib

import torch

from megalite.convert.offline import write_checkpoint
from megalite.model import get_preset

GIB = 1024 ** 3


def synthetic_checkpoint(save: str, preset: str, tp: int, pp: int) -> tuple[int, float]:
    """Write the synthetic checkpoint; returns (parameter count, seconds)."""
    cfg = get_preset(preset)
    count = [0]

    def full_of(name: str) -> torch.Tensor:
        shape = _full_shapes(cfg)[name]
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16)
        if "norm" in name:
            t.fill_(1.0)
        count[0] += t.numel()
        return t

    start = time.perf_counter()
    write_checkpoint(save, cfg, tp, pp, full_of, lambda n: torch.bfloat16,
                     config_dict={"model": preset}, config_type="dict",
                     extra={"consumed_samples": 0, "synthetic": True}, desc="synthetic 7B")
    return count[0], time.perf_counter() - start


_SHAPES: dict = {}


def _full_shapes(cfg) -> dict:
    """Full shapes of every parameter (the TP=1 x PP=1 model on the meta device)."""
    if not _SHAPES:
        from megalite.convert.offline import stage_params
        _SHAPES.update({n: tuple(p.shape) for n, p in stage_params(cfg, 1, 1, 0).items()})
    return _SHAPES


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measured_run(argv: list[str]) -> dict:
    """Run ``python -m megalite ...`` and sample its memory until it exits."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "megalite", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.1)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peaks["VmHWM"] / GIB, 2),
            "peak_rss_anon_gib": round(peaks["RssAnon"] / GIB, 2),
            "peak_rss_file_gib": round(peaks["RssFile"] / GIB, 2),
            "last_line": err.strip().splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/work/bench_convert_7b")
    ap.add_argument("--preset", default="llama2-7b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--directions", default="to-hf,from-hf")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if os.path.exists(args.workdir):
        raise SystemExit(f"{args.workdir} exists; remove it first")
    os.makedirs(args.workdir)
    src, hf, back = (os.path.join(args.workdir, d) for d in ("megalite", "hf", "back"))
    try:
        params, synth_s = synthetic_checkpoint(src, args.preset, args.tp, args.pp)
        weights = params * 2
        result = {"preset": args.preset, "parameters": params, "dtype": "bfloat16",
                  "weights_gib": round(weights / GIB, 2), "layout": f"TP={args.tp} PP={args.pp}",
                  "synthetic_write_s": round(synth_s, 1), "cpu_count": os.cpu_count()}
        directions = args.directions.split(",")
        if "to-hf" in directions:
            result["to_hf"] = measured_run(["convert", "to-hf", "--load", src, "--save", hf])
        if "from-hf" in directions and os.path.isdir(hf):
            result["from_hf"] = measured_run([
                "convert", "from-hf", "--load", hf, "--save", back,
                "--target-tensor-parallel-size", str(args.tp),
                "--target-pipeline-model-parallel-size", str(args.pp)])
        for key in ("to_hf", "from_hf"):
            if key in result:
                r = result[key]
                r["peak_rss_over_weights"] = round(r["peak_rss_gib"] * GIB / weights, 3)
                r["peak_anon_over_weights"] = round(r["peak_rss_anon_gib"] * GIB / weights, 3)
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
