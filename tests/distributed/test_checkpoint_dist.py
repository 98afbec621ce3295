"""Checkpoints across real gloo process groups: any-layout model loading, exact resume, errors.

One 4-process group serves every case. A TP=2 x PP=2 run saves both model recipes; the weights
are then loaded under TP=1 (one process), TP=4, TP=1 x PP=4, TP=1 x PP=2 x 2 virtual stages
(with DP=2) and the saved layout itself, and the logits of a fixed batch are compared.

Tolerance: the loaded full weights must be bit-identical to the saved model's, and the logits
equal the saved model's within 1e-6 of the largest logit (max |diff| <= 1e-6 * max |logit|; the
logits are O(1), 2-3 at most, as the weights are drawn with std 0.1). Only the summation order
changes with the split (partial products all-reduced over TP, other attention head grouping),
which moves float32 results by a few ulps (one ulp at 2-4 is 2.4e-7..4.8e-7; measured: up to
1.8e-6 absolute at max 3.06). Reloading into the saved layout must be bitwise.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist

from harness import DistributedWorkers

from megalite.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext
from megalite.parallel.random import model_parallel_seed
from megalite.parallel.sharding import init_parameter_, set_sharding

REL = 1e-6
B, S = 2, 12
# 4 layers so PP=4 and PP=2 x VP=2 split evenly; heads/groups/FFN divisible by TP=4; vocab 203
# pads to 208 at TP=1,2 and to 224 at TP=4, so the vocabulary rows must be re-padded.
RECIPES = {
    "classic": get_preset("tiny").replace(num_layers=4, hidden_size=32, num_attention_heads=4,
                                          vocab_size=203, make_vocab_size_divisible_by=8),
    "llama": get_preset("tiny-llama").replace(num_layers=4, hidden_size=64, num_attention_heads=8,
                                              num_query_groups=4, ffn_hidden_size=96,
                                              vocab_size=203, make_vocab_size_divisible_by=8),
}
WORD = "embedding.word_embeddings.weight"


def chunk_ranges(num_layers, pp, vp, pp_rank):
    """Megatron's interleaved order: virtual stage v = chunk * pp + pp_rank holds block v."""
    per = num_layers // (pp * vp)
    return [((c * pp + pp_rank) * per, (c * pp + pp_rank + 1) * per) for c in range(vp)]


def build(cfg, ps, vp=1, seed=0):
    ranges = chunk_ranges(cfg.num_layers, ps.pp_size, vp, ps.pp_rank)
    n_virtual = ps.pp_size * vp
    tracker = model_parallel_seed(1234, ps)
    chunks = []
    for c, rng in enumerate(ranges):
        v = c * ps.pp_size + ps.pp_rank
        chunks.append(GPTModel(cfg, ModelContext(ps, rng_tracker=tracker), pre_process=v == 0,
                               post_process=v == n_virtual - 1, layer_range=rng))
    for chunk in chunks:
        chunk.init_weights(seed)
    return chunks


def randomize_(chunks, ps, seed, vocab):
    """Layout-independent random weights (std 0.1; norms around 1), padding rows zero."""
    def fill(name):
        def fn(t, g):
            t.normal_(0.0, 0.1, generator=g)
            if "norm" in name:
                t.add_(1.0)
            if name in (WORD, "output_layer.weight"):
                t[vocab:] = 0
        return fn
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key = WORD if getattr(p, "shared_embedding", False) else name
            init_parameter_(p, fill(key), seed, key, ps)


def adam_step(chunks, ps, vocab):
    """One AdamW step on layout-independent gradients: the full model stays layout independent,
    and the optimizer holds real state."""
    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key = WORD if getattr(p, "shared_embedding", False) else name
            g = set_sharding(torch.empty_like(p), getattr(p, "tensor_parallel_dim", None),
                             getattr(p, "partition_stride", 1))
            def fn(t, gen, key=key):
                t.normal_(0.0, 1.0, generator=gen)
                if key in (WORD, "output_layer.weight"):
                    t[vocab:] = 0
            init_parameter_(g, fn, 77, "grad:" + key, ps)
            p.grad = g
    opt.step()
    opt.zero_grad()
    return opt


def tokens(cfg):
    return torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def pipeline_logits(chunks, ps, cfg):
    """Forward of the whole (virtual) pipeline with plain send/recv; the full [b, s, vocab] logits
    on the ranks of the last stage, None elsewhere."""
    n_virtual = ps.pp_size * len(chunks)
    x = None
    shape = (S, B, cfg.hidden_size)
    for v in range(n_virtual):
        owner, c = v % ps.pp_size, v // ps.pp_size
        if owner != ps.pp_rank:
            continue
        if v == 0:
            inp = tokens(cfg)
        elif (v - 1) % ps.pp_size == ps.pp_rank:
            inp = x
        else:
            inp = torch.empty(shape)
            dist.recv(inp, src=ps.pp_group_ranks[(v - 1) % ps.pp_size])
        x = chunks[c](inp)
        if v + 1 < n_virtual and (v + 1) % ps.pp_size != ps.pp_rank:
            dist.send(x.contiguous(), dst=ps.pp_group_ranks[(v + 1) % ps.pp_size])
    if not ps.is_last_pp_stage:
        return None
    if ps.tp_size > 1:
        parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=ps.tp_group)
        x = torch.cat(parts, dim=-1)
    return x[..., :cfg.vocab_size].clone()


def params_of(chunks):
    return {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}


def weights_off(chunks, cfg):
    """Names whose loaded full tensor is not bit-identical to the saved model's. The reference
    is recomputed in this process at TP=1 (init and the Adam step are elementwise on
    layout-independent full tensors, so it equals the saved TP=2 x PP=2 model bit for bit);
    padding rows must be zero. Collective over the tp group (all tp ranks call it)."""
    ref_ps = ParallelState.single()
    ref = build(cfg, ref_ps)
    randomize_(ref, ref_ps, 5, cfg.vocab_size)
    adam_step(ref, ref_ps, cfg.vocab_size)
    want = params_of(ref)
    off = []
    for chunk in chunks:
        for name, full in chunk.full_state_dict().items():
            r = want.get(name, want[WORD])        # a tied output layer copy equals the embedding
            v = cfg.vocab_size
            if name in (WORD, "output_layer.weight"):
                ok = torch.equal(full[:v], r[:v]) and not full[v:].any()
            else:
                ok = torch.equal(full, r)
            if not ok:
                off.append(name)
    return off


# -- worker functions (run on every rank) ---------------------------------------------------------
def w_save(root):
    ps = ParallelState.build(2, 2)
    out = {}
    for name, cfg in RECIPES.items():
        chunks = build(cfg, ps)
        randomize_(chunks, ps, 5, cfg.vocab_size)
        opt = adam_step(chunks, ps, cfg.vocab_size)
        save_checkpoint(os.path.join(root, name), 20, model_chunks=chunks, optimizer=opt,
                        config={"recipe": name}, ps=ps, extra={"consumed_samples": 640})
        out[name] = {"logits": pipeline_logits(chunks, ps, cfg), "params": params_of(chunks),
                     "opt": opt.state_dict()}
    return out


def w_load(root, tp, pp, vp):
    if tp * pp == 1 and dist.get_rank() != 0:
        return None                     # TP=1 x PP=1: one process, no process group at all
    ps = ParallelState.single() if tp * pp == 1 else ParallelState.build(tp, pp)
    out = {}
    for name, cfg in RECIPES.items():
        chunks = build(cfg, ps, vp=vp, seed=99)
        returned = load_model_weights(os.path.join(root, name), chunks, ps)
        assert returned == {"recipe": name}
        out[name] = {"logits": pipeline_logits(chunks, ps, cfg),
                     "weights_off": weights_off(chunks, cfg)}
    return out


def w_resume_same_layout(root):
    """Reload into the saved layout with fresh models/optimizers: everything bitwise."""
    ps = ParallelState.build(2, 2)
    out = {}
    for name, cfg in RECIPES.items():
        chunks = build(cfg, ps, seed=42)
        opt = adam_step(chunks, ps, cfg.vocab_size)   # different state, to be overwritten
        extra = load_checkpoint(os.path.join(root, name), model_chunks=chunks, optimizer=opt, ps=ps)
        out[name] = {"params": params_of(chunks), "opt": opt.state_dict(), "extra": extra}
    return out


def _rng_draws(tracker):
    import random

    import numpy as np
    with tracker.fork():
        tp = torch.rand(4)
    return [random.random(), float(np.random.rand()), torch.rand(4), tp]


def w_dp_resume(root):
    """TP=2 x DP=2: only data-parallel rank 0 writes model files; every rank's optimizer and
    RNG state (including the TP tracker, different per tp rank) resumes exactly."""
    ps = ParallelState.build(2, 1)
    cfg = RECIPES["llama"]
    chunks = build(cfg, ps)
    randomize_(chunks, ps, 5, cfg.vocab_size)
    opt = adam_step(chunks, ps, cfg.vocab_size)
    directory = os.path.join(root, "dp")
    save_checkpoint(directory, 3, model_chunks=chunks, optimizer=opt, config={}, ps=ps,
                    extra={"consumed_samples": 96})
    files = sorted(os.listdir(os.path.join(directory, "iter_0000003")))
    expected = _rng_draws(chunks[0].rng_tracker)
    torch.manual_seed(1000 + ps.rank)
    fresh = build(cfg, ps, seed=8)
    opt2 = adam_step(fresh, ps, cfg.vocab_size)
    extra = load_checkpoint(directory, model_chunks=fresh, optimizer=opt2, ps=ps)
    got = _rng_draws(fresh[0].rng_tracker)
    same = (got[:2] == expected[:2] and torch.equal(got[2], expected[2])
            and torch.equal(got[3], expected[3]))
    bitwise = all(torch.equal(a, b) for a, b in zip(params_of(chunks).values(),
                                                     params_of(fresh).values(), strict=True))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    opt_same = all(torch.equal(s1[k][f], s2[k][f]) for k in s1 for f in ("exp_avg", "exp_avg_sq"))
    # Another layout with a plain torch optimizer (state not keyed by name): refused on every
    # rank, with the reason.
    other = ParallelState.build(4, 1)
    try:
        load_checkpoint(directory, model_chunks=build(cfg, other), ps=other,
                        optimizer=adam_step(build(cfg, other), other, cfg.vocab_size))
        refused = None
    except MegaliteError as e:
        refused = str(e)
    return {"files": files, "rng_same": same, "bitwise": bitwise, "opt_same": opt_same,
            "extra": extra["consumed_samples"], "tp_tracker": expected[3], "refused": refused}


def w_load_error(directory):
    ps = ParallelState.build(2, 2)
    cfg = RECIPES["classic"]
    chunks = build(cfg, ps)
    opt = adam_step(chunks, ps, cfg.vocab_size)
    try:
        load_checkpoint(directory, model_chunks=chunks, optimizer=opt, ps=ps)
    except MegaliteError as e:
        return str(e)
    return None


class _BadOnRank2(torch.optim.AdamW):
    def state_dict(self):
        state = super().state_dict()
        if dist.get_rank() == 2:
            state["scaler"] = object()    # not loadable with weights_only: refused at save
        return state


def w_save_error(directory):
    ps = ParallelState.build(2, 2)
    cfg = RECIPES["classic"]
    chunks = build(cfg, ps)
    opt = _BadOnRank2([p for c in chunks for p in c.parameters()])
    try:
        save_checkpoint(directory, 30, model_chunks=chunks, optimizer=opt, config={}, ps=ps,
                        extra={})
    except MegaliteError as e:
        return str(e)
    return None


# -- tests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(4, timeout=300) as w:
        yield w


@pytest.fixture(scope="module")
def saved(workers, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    results = workers.run(w_save, root)
    ref = {name: {"logits": next(r[name]["logits"] for r in results
                                 if r[name]["logits"] is not None)} for name in RECIPES}
    for name in RECIPES:
        assert ref[name]["logits"].abs().max() > 0.5      # O(1) logits: 1e-6 is meaningful
    return root, results, ref


@pytest.mark.parametrize("tp,pp,vp", [(1, 1, 1), (4, 1, 1), (1, 4, 1), (1, 2, 2)],
                         ids=["tp1", "tp4", "tp1xpp4", "tp1xpp2xvp2-dp2"])
def test_model_loads_under_another_layout_with_equal_logits(workers, saved, tp, pp, vp):
    root, _, ref = saved
    results = workers.run(w_load, root, tp, pp, vp)
    for name in RECIPES:
        got = [r[name]["logits"] for r in results
               if r is not None and r[name]["logits"] is not None]
        assert got, "no rank returned logits"
        for logits in got:
            diff = (logits - ref[name]["logits"]).abs().max().item()
            scale = ref[name]["logits"].abs().max().item()
            assert diff <= REL * scale, f"{name}: max |logit diff| {diff:.3g} > {REL} x {scale:.3g}"
        assert all(r[name]["weights_off"] == [] for r in results if r is not None), name


def test_same_layout_resume_is_bitwise(workers, saved):
    root, before, _ = saved
    after = workers.run(w_resume_same_layout, root)
    for rank in range(4):
        for name in RECIPES:
            a, b = before[rank][name], after[rank][name]
            assert a["params"].keys() == b["params"].keys()
            for n in a["params"]:
                assert torch.equal(a["params"][n], b["params"][n]), (rank, name, n)
            for k, st in a["opt"]["state"].items():
                for f in ("step", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(st[f], b["opt"]["state"][k][f]), (rank, name, k, f)
            extra = b["extra"]
            assert extra["iteration"] == 20 and extra["consumed_samples"] == 640
            assert extra["rng_restored"] and not extra["layout_changed"]


def test_dp_ranks_share_model_files_and_resume_exactly(workers, tmp_path):
    results = workers.run(w_dp_resume, str(tmp_path))
    assert results[0]["files"] == ["config.json", "manifest.json", "meta.json",
                                   "model_tp00_pp00.safetensors", "model_tp01_pp00.safetensors",
                                   "rank_00000.pt", "rank_00001.pt", "rank_00002.pt",
                                   "rank_00003.pt"]
    for r in results:
        assert r["rng_same"] and r["bitwise"] and r["opt_same"] and r["extra"] == 96
        assert "cannot take state from another layout" in r["refused"]
        assert "TP=2 PP=1 DP=2" in r["refused"]
    # The restored tracker streams really differ per tp rank (so restoring them is a real check).
    assert not torch.equal(results[0]["tp_tracker"], results[1]["tp_tracker"])


@pytest.mark.parametrize("victim", ["rank_00003.pt", "model_tp01_pp01.safetensors"])
def test_corrupt_file_is_named_on_every_rank(workers, saved, tmp_path, victim):
    root, _, _ = saved
    directory = str(tmp_path / "copy")
    shutil.copytree(os.path.join(root, "classic"), directory)
    path = os.path.join(directory, "iter_0000020", victim)
    data = bytearray(open(path, "rb").read())
    data[-200] ^= 0x01                    # one bit, same size: only the sha256 can tell
    open(path, "wb").write(data)
    errors = workers.run(w_load_error, directory)
    for e in errors:   # raised on every rank (no rank left waiting), naming the file
        assert e is not None and path in e and "corrupt" in e


def test_missing_file_is_named_on_every_rank(workers, saved, tmp_path):
    root, _, _ = saved
    directory = str(tmp_path / "copy")
    shutil.copytree(os.path.join(root, "classic"), directory)
    path = os.path.join(directory, "iter_0000020", "model_tp00_pp01.safetensors")
    os.remove(path)
    for e in workers.run(w_load_error, directory):
        assert e is not None and f"{path} is missing" in e


def test_failure_on_one_rank_fails_the_save_everywhere(workers, saved, tmp_path):
    root, _, _ = saved
    directory = str(tmp_path / "copy")
    shutil.copytree(os.path.join(root, "classic"), directory)
    errors = workers.run(w_save_error, directory)
    for e in errors:
        assert e is not None and "rank 2" in e and "previous checkpoint is untouched" in e
    assert sorted(os.listdir(directory)) == ["iter_0000020", "latest"]
    assert open(os.path.join(directory, "latest")).read() == "iter_0000020\n"
