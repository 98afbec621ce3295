"""Decoding speed of megalite's KV cache vs. re-running the whole sequence (and vs. Hugging Face).

Greedy decoding of ``--new`` tokens after a ``--prompt``-token prompt, batch ``--batch``, on a
randomly initialized LLaMA-recipe model (TP=1, float32, CPU unless CUDA is present). Three ways:

* ``kv_cache``: megalite's loop (prefill once, then one token per forward);
* ``full_recompute``: the same loop re-running the full sequence each step (``use_cache=False``);
* ``hf_generate``: ``transformers.LlamaForCausalLM.generate(do_sample=False)`` on the same weights
  (converted with ``megalite.convert``; its own dynamic cache, SDPA attention).

The tokens of all three are checked equal. Prints one JSON object: seconds (median of
``--repeats``) of wall clock and of this process's CPU time (on a shared, loaded machine the
CPU time, with one thread, is the figure other jobs disturb least), new tokens per second of
each, and the speedup of the cache over recompute.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megalite.convert import config_to_hf, to_hf
from megalite.distributed.parallel_state import ParallelState
from megalite.inference import SamplingConfig, generate_tokens
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_preset("tiny-llama").replace(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        max_position_embeddings=args.prompt + args.new, seq_length=None, init_method_std=0.3)
    model = GPTModel(cfg, ModelContext(ParallelState.single(), device=device)).eval()
    model.init_weights(0)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(0))

    def timed(fn):
        fn()                                                   # warm-up
        times, cpu, out = [], [], None
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return statistics.median(times), statistics.median(cpu), out

    greedy = SamplingConfig()
    runs = {
        "kv_cache": lambda: generate_tokens(model, prompt, args.new, greedy).tokens,
        "full_recompute": lambda: generate_tokens(model, prompt, args.new, greedy,
                                                  use_cache=False).tokens,
    }
    if not args.no_hf:
        import transformers
        hf_cfg = config_to_hf(cfg)
        hf = transformers.LlamaForCausalLM(hf_cfg).to(device).eval()
        hf.load_state_dict(to_hf(model.full_state_dict(), cfg))
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        mask = torch.ones_like(prompt, device=device)
        runs["hf_generate"] = lambda: hf.generate(
            prompt.to(device), attention_mask=mask, do_sample=False,
            max_new_tokens=args.new)[:, args.prompt:].cpu()
    result = {"device": str(device), "torch": torch.__version__, "threads": args.threads,
              "params": sum(t.numel() for t in model.parameters()), "batch": args.batch,
              "prompt_tokens": args.prompt, "new_tokens": args.new}
    tokens = {}
    with torch.no_grad():
        for name, fn in runs.items():
            seconds, cpu, tokens[name] = timed(fn)
            result[name] = {"seconds": round(seconds, 4), "cpu_seconds": round(cpu, 4),
                            "new_tokens_per_s": round(args.batch * args.new / seconds, 1),
                            "new_tokens_per_cpu_s": round(args.batch * args.new / cpu, 1)}
    ref = tokens["kv_cache"]
    result["tokens_equal"] = {n: bool(torch.equal(t, ref)) for n, t in tokens.items()}
    for key in ("seconds", "cpu_seconds"):
        result[f"cache_speedup_over_recompute_{key}"] = round(
            result["full_recompute"][key] / result["kv_cache"][key], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
