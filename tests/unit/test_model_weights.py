"""Model construction and the weights lifecycle: the model context, building without drawing,
the parameter-name constants, vocabulary padding, and the 7B preset's shard built and
initialized in one process without the full model in host memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from megalite.convert import hf_gpt2, hf_llama
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model import get_preset, weights
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext
from megalite.parallel.random import MODEL_PARALLEL_RNG, TP_SEED_OFFSET, RNGStatesTracker

GIB = 2**30


def test_model_context_defaults_and_meta_copy():
    ps = ParallelState.for_shapes(4, 3)
    ctx = ModelContext(ps, dtype=torch.bfloat16)
    # The default tracker's model-parallel stream is seeded TP_SEED_OFFSET + tp_rank.
    expected = RNGStatesTracker()
    expected.add(MODEL_PARALLEL_RNG, TP_SEED_OFFSET + 3)
    assert torch.equal(ctx.rng_tracker.get_states()[MODEL_PARALLEL_RNG]["cpu"],
                       expected.get_states()[MODEL_PARALLEL_RNG]["cpu"])
    assert not ctx.is_meta and ctx.resolved_device() == torch.get_default_device()
    meta = ctx.on_meta()
    assert meta.is_meta and meta.ps is ps and meta.rng_tracker is ctx.rng_tracker
    assert meta.dtype == torch.bfloat16 and not ctx.is_meta      # ctx itself is unchanged


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_construction_draws_nothing_and_init_fills_once(preset):
    cfg = get_preset(preset)
    state = torch.get_rng_state()
    model = GPTModel(cfg, ModelContext(ParallelState.for_shapes(2, 1), dtype=torch.bfloat16))
    # No value is drawn at construction (neither from torch's default generator nor named).
    assert torch.equal(torch.get_rng_state(), state)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params.values())
    assert params["layers.0.mlp.linear_fc1.weight"].tensor_parallel_dim == 0   # attributes kept
    model.init_weights(4)
    assert torch.equal(torch.get_rng_state(), state)
    ref = GPTModel(cfg, ModelContext(ParallelState.for_shapes(2, 1), dtype=torch.bfloat16,
                                     device="meta")).to_empty(device="cpu")
    ref.init_weights(4)
    for name, p in ref.named_parameters():
        assert torch.equal(params[name], p), name


@pytest.mark.parametrize("module, changes", [
    (hf_llama, {}),                                                    # untied output layer
    (hf_llama, dict(add_qkv_bias=True)),                               # Qwen2's qkv bias
    (hf_llama, dict(add_bias_linear=True, untie_embeddings_and_output_weights=False)),
    (hf_gpt2, {}),                                                     # learned positions, tied
])
def test_name_constants_spell_the_model_parameters(module, changes):
    """The HF name maps are written with model.weights' constants: their megalite side must be
    exactly the parameters the model registers."""
    base = "tiny" if module is hf_gpt2 else "tiny-llama"
    cfg = get_preset(base).replace(**changes)
    model = GPTModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    names = {n for n, _ in model.named_parameters()}
    assert {m.megalite for m in module.param_mappings(cfg)} == names
    assert weights.WORD_EMBEDDINGS in names
    assert (weights.OUTPUT_LAYER in names) == (not cfg.tied_embeddings)
    assert f"{weights.layer_prefix(1)}{weights.LINEAR_FC2}.weight" in names


def test_fit_vocab_rows_pads_with_zeros_and_names_short_tensors():
    full = torch.arange(12.0).view(6, 2)
    assert weights.fit_vocab_rows(full, 6, 5, "x") is full
    out = weights.fit_vocab_rows(full, 8, 5, "x")
    assert torch.equal(out[:5], full[:5]) and not out[5:].any()     # the old padding row too
    assert torch.equal(weights.fit_vocab_rows(full, 5, 5, "x"), full[:5])
    with pytest.raises(MegaliteError, match=r"emb: 6 rows .* fewer than vocab_size=7"):
        weights.fit_vocab_rows(full, 8, 7, "emb")


# The 7B test runs in a fresh process so that its peak RSS (VmHWM) is this build alone.
SHARD_7B = textwrap.dedent("""
    import json, torch
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model import get_preset
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

    cfg = get_preset("llama2-7b")
    before = status("VmRSS")
    state = torch.get_rng_state()
    # The last rank: its vocabulary rows end with the 768 padding rows.
    model = GPTModel(cfg, ModelContext(ParallelState.for_shapes(8, 7), dtype=torch.bfloat16))
    model.init_weights(1234)
    p = dict(model.named_parameters())
    print(json.dumps({
        "growth": status("VmHWM") - before,
        "shard_bytes": sum(t.numel() * t.element_size() for t in p.values()),
        "full_params": sum(t.numel() * (8 if t.tensor_parallel_dim is not None else 1)
                           for t in p.values()),
        "largest_full": max(t.numel() * (8 if t.tensor_parallel_dim is not None else 1)
                            for t in p.values()),
        "drew_default": not torch.equal(state, torch.get_rng_state()),
        "sample": p["layers.31.mlp.linear_fc2.weight"][:2, :3].float().tolist(),
        "pad_rows_zero": not p["output_layer.weight"][-768:].any().item(),
        "real_rows_drawn": bool(p["output_layer.weight"][-769].all().item()),
    }))
""")


def test_llama2_7b_tp8_shard_builds_and_initializes_without_the_full_model():
    """One TP=8 rank of llama2-7b in bf16, built and initialized in one process.

    Bound on the peak RSS growth: this rank's shard (its bytes, ~1.6 GiB) + the largest full
    tensor in fp32 and its fp32 shard (init draws each full tensor on CPU, one at a time: the
    [32768, 4096] vocabulary matrix, 512 MiB + 64 MiB) + 256 MiB for the interpreter's own
    growth (modules, allocator). About 2.4 GiB, against 12.6 GiB for the full model in bf16
    (25 GiB in fp32): holding the full model even once would break it."""
    out = subprocess.run([sys.executable, "-c", SHARD_7B], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout)
    full_bf16 = r["full_params"] * 2
    assert r["full_params"] == 6_738_415_616 + 2 * 768 * 4096      # + TP=8 vocab padding
    bound = r["shard_bytes"] + r["largest_full"] * 4 * (1 + 1 / 8) + 256 * 2**20
    assert r["shard_bytes"] < 1.7 * GIB and bound < full_bf16 / 4
    assert r["growth"] <= bound, (r["growth"] / GIB, bound / GIB)
    assert r["growth"] >= r["shard_bytes"]          # the measurement sees the shard's pages
    assert not r["drew_default"] and r["pad_rows_zero"] and r["real_rows_drawn"]
    # Initialized, from N(0, 0.02 / sqrt(2 * 32)): finite, nonzero, within 6 sigma.
    sample = torch.tensor(r["sample"])
    assert sample.abs().min() > 0 and sample.abs().max() < 6 * 0.02 / 8
