"""Context parallelism on CPU: activation memory per rank and step time at CP = 1, 2, 4 for one
long sequence.

A GPT model of megalite (``GPTModel``: RoPE, RMSNorm, SwiGLU, grouped-query attention; small
hidden size so that the sequence, not the weights, dominates) runs forward + backward of one
microbatch of ``--seq`` random tokens, its sequence split over ``cp`` gloo processes (each rank
builds its load-balanced chunks as the trainer's data path does; attention is the ring of
:mod:`megalite.parallel.context_parallel`). Per CP size, each rank reports:

* ``saved_mib``: the activations kept for backward (every tensor autograd saves, counted once
  per storage, parameters excluded): the activation memory CP divides;
* ``peak_extra_mib``: the peak anonymous resident memory (sampled every 2 ms) during the step
  minus that before it: activations plus the transient buffers of forward and backward;
* ``step_s``: the wall time of a step, ``cpu_s``: the CPU time the rank's process used in it
  (all its threads), each the median over ``--iters`` steps after one warm-up step. On a shared
  or oversubscribed machine ``cpu_s`` is the figure to compare: the work of the busiest rank,
  what its step would take on cores of its own (waiting in gloo costs no CPU).

The JSON line per CP size gives the worst rank and the ratios to CP = 1 (``saved_ratio``
expected ~1/CP; ``step_ratio``: the step time's). Every rank runs ``--threads`` intra-op threads
(the same for every CP size, so CP = 4 uses 4x the cores of CP = 1). ``--documents N`` packs
documents of N tokens (``--reset-attention-mask``: ring steps of other documents skipped).

    python benchmarks/context_parallel_bench.py --seq 16384 --cp 1 2 4 --threads 4
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
from proc_memory import AnonPeak, status_mib


def _saved_bytes(model, step) -> int:
    """Bytes of the tensors autograd saves during ``step()`` (forward only), each storage once,
    the parameters' storages excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type != "meta":
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    total = sum(seen.values())
    loss.backward()
    return total


def _rank(rank: int, cp: int, store: str, args, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(cp))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=cp)
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model.config import TransformerConfig
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    from megalite.parallel.context_parallel import local_microbatch

    ps = ParallelState.build(context_parallel_size=cp)
    s = args.seq
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, ffn_hidden_size=args.hidden * 8 // 3,
        vocab_size=args.vocab, max_position_embeddings=s, seq_length=s,
        position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
        add_bias_linear=False, untie_embeddings_and_output_weights=True)
    model = GPTModel(config, ModelContext(ps))
    model.init_weights(1)
    gen = torch.Generator().manual_seed(5)
    sample = torch.randint(0, args.vocab, (1, s + 1), generator=gen)
    batch = {"tokens": sample[:, :-1], "labels": sample[:, 1:]}
    if args.documents:
        batch["doc_ids"] = (torch.arange(s) // args.documents)[None]
    batch = local_microbatch(batch, s, ps)

    def step():
        return model.forward_microbatch(None, batch).float().mean()

    _saved_bytes(model, step)                   # warm-up (allocator, kernels)
    dist.barrier()
    times, cpu, saved, peaks = [], [], 0, []
    for _ in range(args.iters):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        with AnonPeak() as peak:
            base = status_mib()
            t0, c0 = time.perf_counter(), time.process_time()
            saved = _saved_bytes(model, step)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peaks.append(peak.peak - base)
    queue.put({"rank": rank, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
               "saved_mib": saved / 2**20, "peak_extra_mib": max(peaks)})
    dist.barrier()
    dist.destroy_process_group()


def _run(cp: int, args) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank, args=(r, cp, store, args, queue)) for r in range(cp)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=args.timeout) for _ in procs]
        for p in procs:
            p.join()
    if any(p.exitcode for p in procs):
        sys.exit(f"a rank of CP={cp} failed")
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--documents", type=int, default=0,
                    help="tokens per packed document (0: plain causal attention)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    base = None
    for cp in args.cp:
        ranks = _run(cp, args)
        worst = {k: max(r[k] for r in ranks)
                 for k in ("step_s", "cpu_s", "saved_mib", "peak_extra_mib")}
        base = base or worst
        print(json.dumps({
            "cp": cp, "seq": args.seq, "documents": args.documents, "threads": args.threads,
            **{k: round(v, 4) for k, v in worst.items()},
            "saved_ratio": round(worst["saved_mib"] / base["saved_mib"], 4),
            "peak_ratio": round(worst["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9), 4),
            "step_ratio": round(worst["step_s"] / base["step_s"], 4),
            "cpu_ratio": round(worst["cpu_s"] / base["cpu_s"], 4),
            "per_rank": ranks}), flush=True)


if __name__ == "__main__":
    main()
