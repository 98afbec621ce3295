"""Tensor (and sequence) parallel GPT equals the unsharded model: real gloo process groups.

One spawned group per world size (2 and 4; 4 processes on 2 cores) runs every recipe x
sequence-parallel combination; the TP=1 reference runs in the test process with the same seed.

Tolerance: 1e-5 relative, measured as max|TP - ref| <= 1e-5 * max|ref| per tensor (float32).
Tensor parallelism only changes summation order (partial sums all-reduced / reduce-scattered
across ranks, the softmax denominator of the loss summed over vocabulary shards), so results
agree to a few float32 ulps of the tensor's scale; 1e-5 of the largest entry is the issue's
bound. An elementwise relative check would be meaningless for entries near zero. Every
gradient must also be nonzero so the comparison cannot pass vacuously.
"""
from __future__ import annotations


import pytest
import torch

import tp_common
from harness import DistributedWorkers
from tp_common import gathered_results

from megalite.distributed.parallel_state import ParallelState
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext
from megalite.parallel.random import model_parallel_seed

REL = 1e-5
B, S, SEED = 2, 16, 11

# Shapes chosen so TP=4 splits them: 8 heads, 4 kv groups (GQA), FFN 96. vocab 200 pads to
# 256 at TP=2 and 512 at TP=4, where whole vocabulary shards are padding.
RECIPES = {
    "classic-learned": get_preset("tiny").replace(num_attention_heads=8, vocab_size=200),
    "classic-sinusoidal": get_preset("tiny").replace(
        num_attention_heads=8, vocab_size=200, position_embedding_type="sinusoidal"),
    "llama": get_preset("tiny-llama").replace(num_attention_heads=8, num_query_groups=4,
                                              ffn_hidden_size=96, vocab_size=200),
    # Qwen3's query/key norms: replicated [d] weights applied to each rank's own heads, whose
    # gradients are partial sums over tp with or without SP
    "llama-qk-norm": get_preset("tiny-llama").replace(
        num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96, vocab_size=200,
        qk_layernorm=True),
}
CASES = [(name, sp) for name in RECIPES for sp in (False, True)]


def batch(cfg):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    return ids, ids.roll(-1, dims=1)


def run_case(cfg, ps, tracker=None):
    """Forward + backward on one rank; returns full (gathered) logits, loss and grads."""
    model = GPTModel(cfg, ModelContext(ps, rng_tracker=tracker))
    model.init_weights(SEED)
    ids, labels = batch(cfg)
    logits = model(ids)                                        # [b, s, Vp/tp]
    loss = model(ids, labels=labels)                           # [b, s]
    loss.mean().backward()
    return gathered_results(model, logits, loss, ps)


def worker_all_cases(tp):
    ps = ParallelState.build(tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    out = {}
    for name, sp in CASES:
        out[(name, sp)] = run_case(RECIPES[name].replace(sequence_parallel=sp), ps)
    # Only rank 0 ships results (they are gathered); others report their own loss, which must
    # agree with rank 0's (the vocab-parallel loss is replicated on all tp ranks).
    if ps.rank == 0:
        return out
    return {k: v["loss"] for k, v in out.items()}


def worker_recompute(tp):
    """Dropout on, SP on: full and selective recompute give the same grads as no recompute."""
    ps = ParallelState.build(tensor_model_parallel_size=tp)
    cfg = RECIPES["llama"].replace(sequence_parallel=True, hidden_dropout=0.2,
                                   attention_dropout=0.2)
    res = {}
    for gran in (None, "full", "selective"):
        tracker = model_parallel_seed(123, ps)
        res[gran] = run_case(cfg.replace(recompute_granularity=gran), ps, tracker)
    # Dropout must really act: another seed gives another loss.
    res["other_seed_loss"] = run_case(cfg, ps, model_parallel_seed(124, ps))["loss"]
    # Without SP the residual stream is replicated: its dropout masks (default generator, same
    # seed on all tp ranks) must agree, so every rank ends with the same hidden states, while
    # attention dropout (model-parallel stream) acts on each rank's own heads.
    body = GPTModel(cfg.replace(sequence_parallel=False),
                    ModelContext(ps, rng_tracker=model_parallel_seed(125, ps)), post_process=False)
    body.init_weights(SEED)
    hidden = body(batch(cfg)[0]).detach()
    dropless = GPTModel(cfg.replace(sequence_parallel=False, hidden_dropout=0.0,
                                    attention_dropout=0.0), ModelContext(ps), post_process=False)
    dropless.init_weights(SEED)
    res["hidden"] = (hidden, dropless(batch(cfg)[0]).detach())
    return res if ps.rank == 0 else {"hidden": res["hidden"]}


def worker_hf_load(tp):
    """Hugging Face LLaMA weights (GQA) converted and loaded into a TP model: same logits as HF.

    Every rank builds the same HF model (same seed), converts the full state dict and keeps its
    shards; this exercises load_full_state_dict's sharding (grouped QKV, strided [gate; up],
    padded vocabulary) on real ranks. Tolerance 1e-4 as in tests/integration/test_hf_parity.py.
    """
    import transformers
    from megalite.convert import config_to_hf, from_hf
    ps = ParallelState.build(tensor_model_parallel_size=tp)
    cfg = RECIPES["llama"]
    torch.manual_seed(0)
    hf_cfg = config_to_hf(cfg)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    model = GPTModel(cfg, ModelContext(ps)).eval()
    model.load_full_state_dict(from_hf(hf.state_dict(), cfg))
    ids, _ = batch(cfg)
    with torch.no_grad():
        ref = hf(ids).logits
        local = model(ids)
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.tp_group)
    ours = torch.cat(parts, dim=-1)[..., :cfg.vocab_size]
    return (ours - ref).abs().max().item(), ref.abs().max().item()


@pytest.fixture(scope="module")
def references():
    """TP=1 results of every case, in this process."""
    torch.set_num_threads(1)
    return {(name, sp): run_case(RECIPES[name].replace(sequence_parallel=sp),
                                 ParallelState.single()) for name, sp in CASES}


def check_against_reference(results, references, tp):
    rank0 = results[0]
    for key, ref in references.items():
        got = rank0[key]
        cfg = RECIPES[key[0]]
        assert got["logits"].shape[-1] == cfg.padded_vocab(tp)
        tp_common.assert_matches_reference(got, ref, cfg.vocab_size, key, REL)
        for r in range(1, tp):
            assert torch.equal(results[r][key], got["loss"]), f"{key} loss differs on rank {r}"


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_process(tp, references):
    with DistributedWorkers(tp) as workers:
        results = workers.run(worker_all_cases, tp)
        check_against_reference(results, references, tp)
        if tp == 2:
            per_rank = workers.run(worker_recompute, tp)
            rec = per_rank[0]
            for r in range(1, tp):
                assert torch.equal(per_rank[r]["hidden"][0], rec["hidden"][0]), r
            assert not torch.equal(rec["hidden"][0], rec["hidden"][1])   # dropout acted
            base = rec[None]
            assert not torch.equal(rec["other_seed_loss"], base["loss"])
            for gran in ("full", "selective"):
                assert torch.equal(rec[gran]["loss"], base["loss"]), gran
                for name, g in base["grads"].items():
                    assert torch.equal(rec[gran]["grads"][name], g), f"{gran} {name}"
            for err, scale in workers.run(worker_hf_load, tp):
                assert scale > 1.0 and err <= 1e-4, (err, scale)
