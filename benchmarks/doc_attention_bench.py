"""Document-masked attention vs plain causal attention on CPU: time and memory, by kernel.

The attention core alone (forward + backward of q, k, v [1, heads, s, d] float32; key/value
groups for GQA), over one packed sample of ``--seq`` tokens cut into documents of random
lengths (uniform in [--min-doc, --max-doc], seeded), for:

* ``causal``: ``scaled_dot_product_attention(is_causal=True)``, the path megalite takes with
  the document flags off (the baseline of every ratio);
* ``per_doc``: megalite's :class:`~megalite.model.doc_attention.DocumentMask` (one causal SDPA
  per document slice, what ``--reset-attention-mask`` runs);
* ``dense_mask``: SDPA with a dense [1, 1, s, s] bool mask built from the document ids;
* ``flex``: ``torch.nn.attention.flex_attention`` with a block mask from the document ids,
  compiled with ``torch.compile`` (its CPU path needs it); the compile time is reported apart.
  torch has no FlexAttention backward on CPU, so it is timed with ``--forward-only`` (every
  kernel then runs its forward pass only, without gradients).

Each (kernel, length) runs in a fresh subprocess so its memory figure is its own:
``peak_extra_mib`` is the peak anonymous resident memory (sampled every 2 ms) during the timed
steps minus that just before them (q, k, v already allocated). ``time_ms`` is the median of
``--iters`` steps after one warm-up step (for flex: after compiling).

    python benchmarks/doc_attention_bench.py --seq 2048 8192 --heads 8 --groups 8 --dim 64 \
        --iters 2 --threads 1

prints one JSON object per (kernel, length) with its ratios to ``causal`` at that length.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from proc_memory import AnonPeak, status_mib

KERNELS = ("causal", "per_doc", "dense_mask", "flex")


def _doc_ids(seq: int, lo: int, hi: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids, doc, n = torch.empty(seq, dtype=torch.long), 0, 0
    while n < seq:
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids[n:n + length] = doc
        n, doc = n + length, doc + 1
    return ids[None], doc


def _one(args) -> dict:
    """Time and memory of one kernel at one length (in this process)."""
    import torch
    import torch.nn.functional as F

    from megalite.model.doc_attention import DocumentMask

    torch.set_num_threads(args.threads)
    s, a, g, d = args.seq[0], args.heads, args.groups, args.dim
    doc, ndocs = _doc_ids(s, args.min_doc, args.max_doc, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(1, n, s, d, generator=gen).requires_grad_(not args.forward_only)
               for n in (a, g, g))
    gqa = a != g
    compile_s = None
    if args.one == "causal":
        def fn():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif args.one == "per_doc":
        def fn():
            return DocumentMask(doc).attend(q, k, v, None)     # runs found per call, as a step
    elif args.one == "dense_mask":
        def fn():
            pos = torch.arange(s)
            mask = (doc[:, :, None] == doc[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                                  enable_gqa=gqa)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        docs = doc[0]

        def mask_mod(b, h, qi, ki):
            return (docs[qi] == docs[ki]) & (ki <= qi)

        def fn():
            block = create_block_mask(mask_mod, None, None, s, s, device="cpu")
            return flex(q, k, v, block_mask=block, enable_gqa=gqa)
    def step():
        if args.forward_only:
            with torch.no_grad():
                fn()
        else:
            q.grad = k.grad = v.grad = None
            fn().sum().backward()
    if args.one == "flex":
        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
    step()                                                     # warm-up
    base = status_mib()
    peak = AnonPeak()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    extra = peak.stop() - base
    out = dict(kernel=args.one, seq=s, heads=a, groups=g, dim=d, documents=ndocs,
               threads=args.threads, forward_only=args.forward_only, time_ms=round(statistics.median(times) * 1e3, 2),
               peak_extra_mib=round(extra, 1))
    if compile_s is not None:
        out["compile_s"] = round(compile_s, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--min-doc", type=int, default=256)
    p.add_argument("--max-doc", type=int, default=2048)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    p.add_argument("--dense-max-seq", type=int, default=8192,
                   help="skip dense_mask above this length (its [s, s] mask and scores)")
    p.add_argument("--forward-only", action="store_true",
                   help="time the forward pass only, without gradients (FlexAttention has no "
                   "backward on CPU)")
    p.add_argument("--one", choices=KERNELS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(_one(args)))
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    for s in args.seq:
        base = None
        for kernel in args.kernels:
            if kernel == "dense_mask" and s > args.dense_max_seq:
                print(json.dumps(dict(kernel=kernel, seq=s, skipped=f"above --dense-max-seq "
                                      f"{args.dense_max_seq}")))
                continue
            argv = [sys.executable, os.path.abspath(__file__), "--one", kernel, "--seq", str(s)]
            for name in ("heads", "groups", "dim", "min_doc", "max_doc", "iters", "threads",
                         "seed"):
                argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            argv += ["--forward-only"] if args.forward_only else []
            run = subprocess.run(argv, capture_output=True, text=True, env=env)
            if run.returncode:
                print(json.dumps(dict(kernel=kernel, seq=s, failed=run.stderr.strip()[-300:])))
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            if kernel == "causal":
                base = result
            if base is not None:
                result["time_vs_causal"] = round(result["time_ms"] / base["time_ms"], 3)
                result["mem_vs_causal"] = round(result["peak_extra_mib"]
                                                / max(base["peak_extra_mib"], 1e-9), 3)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
