"""Checkpoint save/load throughput and the peak memory of any-layout weight loading.

Each phase runs in a fresh subprocess so its peak resident memory (VmHWM) is its own:

* ``save``: model + AdamW state (one step on random gradients) saved with ``save_checkpoint``
  (safetensors model file, torch.save rank file, fsync, sha256, manifest, rename).
* ``load``: ``load_checkpoint`` into a fresh model and optimizer (same layout), with and without
  sha256 verification.
* ``weights-same`` / ``weights-tp2``: ``load_model_weights`` into a TP=1 model, and into the
  TP=2 rank-0 shard of the model (built with ``ParallelState.for_shapes``: the load is local,
  no process group needed), which unshards/reshards tensor by tensor.

The memory figure that matters is ``peak_extra_anon_mib``: the peak anonymous memory during the
phase minus that just before it (model already built), sampled every 2 ms. Streaming keeps it near
the largest single tensor (the embedding), not the model size. ``peak_extra_rss_mib`` (VmHWM)
also counts the memory-mapped safetensors pages, which are reclaimable page cache.

    python benchmarks/checkpoint_io.py --layers 8 --hidden 768 --heads 12 --vocab 32000

prints one JSON object per phase.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from proc_memory import AnonPeak, status_mib


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def phase(args: argparse.Namespace) -> dict:
    import torch

    from megalite.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model.config import TransformerConfig
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext

    torch.set_num_threads(args.threads)
    cfg = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden,
                    num_attention_heads=args.heads, vocab_size=args.vocab,
                    max_position_embeddings=1024, position_embedding_type="rope",
                    normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                    untie_embeddings_and_output_weights=True)
    ps = (ParallelState.for_shapes(tp_size=2, tp_rank=0) if args.phase == "weights-tp2"
          else ParallelState.single())
    model = GPTModel(cfg, ModelContext(ps))
    n_params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    out = {"phase": args.phase, "params_this_rank": n_params,
           "model_mib": n_params * 4 / 2**20, "largest_tensor_mib": largest * 4 / 2**20}
    opt = torch.optim.AdamW(model.parameters())
    if args.phase in ("save", "load"):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()                              # allocates the Adam moments
        opt.zero_grad(set_to_none=True)
    if args.phase == "save":
        model.init_weights(1)
    base, base_anon = status_mib("VmRSS"), status_mib("RssAnon")
    _reset_peak()
    sampler = AnonPeak()
    t0 = time.perf_counter()
    if args.phase == "save":
        path = save_checkpoint(args.dir, 1, model_chunks=[model], optimizer=opt, config={},
                               ps=ps, extra={})
        out["bytes"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    elif args.phase == "load":
        load_checkpoint(args.dir, model_chunks=[model], optimizer=opt, ps=ps,
                        verify_checksums=args.verify)
        out["verify_checksums"] = args.verify
    else:
        load_model_weights(args.dir, [model], ps, verify_checksums=args.verify)
        out["verify_checksums"] = args.verify
    out["seconds"] = time.perf_counter() - t0
    out["peak_extra_anon_mib"] = sampler.stop() - base_anon
    out["peak_extra_rss_mib"] = status_mib("VmHWM") - base
    if "bytes" in out:
        out["gb_per_s"] = out["bytes"] / out["seconds"] / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--verify", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        common = [sys.executable, __file__, "--layers", str(args.layers), "--hidden",
                  str(args.hidden), "--heads", str(args.heads), "--vocab", str(args.vocab),
                  "--threads", str(args.threads), "--dir", d]
        for ph, verify in (("save", 1), ("load", 1), ("load", 0), ("weights-same", 1),
                           ("weights-same", 0), ("weights-tp2", 0)):
            res = subprocess.run(common + ["--phase", ph, "--verify", str(verify)],
                                 check=True, capture_output=True, text=True)
            print(res.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
