"""The GPT model in one process (TP=1): loss, padding, init, recompute, pipeline slices, positions.

Tolerances: comparisons of two computations that do the same float32 operations in the same
order are exact (``torch.equal``); where the order of a reduction changes (a different but
mathematically equal formula) we allow 1e-6 relative to the tensor's largest entry, a few
float32 ulps of accumulated rounding for these tiny models.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model import get_preset
from megalite.model.gpt import GPTModel
from megalite.model.positions import sinusoidal_table
from megalite.parallel.context import ModelContext
from megalite.parallel.random import model_parallel_seed
from megalite.parallel.sharding import unshard_tensors


def close(a, b, rel=1e-6):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() <= rel * max(scale, 1e-30)


def build(cfg, seed=1, ps=None, rng_tracker=None, dtype=None, **kw):
    ps = ps or ParallelState.single()
    model = GPTModel(cfg, ModelContext(ps, rng_tracker, dtype=dtype), **kw)
    model.init_weights(seed)
    return model


@pytest.fixture(params=["tiny", "tiny-llama"])
def cfg(request):
    return get_preset(request.param).replace(vocab_size=200)   # padded to 256


def ids_for(cfg, b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (b, s), generator=g)


def test_loss_is_cross_entropy_over_real_vocab_and_padding_is_masked(cfg):
    model = build(cfg)
    ids = ids_for(cfg)
    logits = model(ids)
    assert logits.shape == (2, 16, 256)
    pad = logits[..., cfg.vocab_size:]
    assert torch.all(pad == torch.finfo(torch.float32).min)
    loss = model(ids, labels=ids.roll(-1, 1))
    ref = F.cross_entropy(logits[..., :cfg.vocab_size].flatten(0, 1), ids.roll(-1, 1).flatten(),
                          reduction="none").view(2, 16)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32
    assert close(loss, ref)
    # Near-uniform predictions at init: loss ~ ln(vocab), not ln(padded vocab).
    assert abs(loss.mean().item() - math.log(cfg.vocab_size)) < 0.1
    loss.mean().backward()
    w = model.output_weight()
    assert w.grad[cfg.vocab_size:].abs().max() == 0          # padding rows learn nothing
    assert w.grad[:cfg.vocab_size].abs().max() > 0
    assert torch.all(w[cfg.vocab_size:] == 0)


def test_model_is_causal(cfg):
    model = build(cfg)
    ids = ids_for(cfg)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % cfg.vocab_size
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.equal(a[:, 10:], b[:, 10:])


def test_init_is_megatron_style_and_reproducible(cfg):
    a, b, c = build(cfg, seed=3), build(cfg, seed=3), build(cfg, seed=4)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if "norm" in n and n.endswith("weight"):
            assert torch.all(p == 1), n
        elif n.endswith("bias"):
            assert torch.all(p == 0), n
        else:
            assert not torch.equal(p, r), n           # the seed matters
    std = cfg.init_method_std
    L = cfg.num_layers
    fc1 = a.layers["0"].mlp.linear_fc1.weight
    fc2 = a.layers["0"].mlp.linear_fc2.weight
    assert abs(fc1.std().item() - std) < 0.1 * std
    assert abs(fc2.std().item() - std / math.sqrt(2 * L)) < 0.1 * std / math.sqrt(2 * L)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_init_is_layout_independent(tp):
    """Same seed -> same full weights at TP=1 and TP=2/4/8 (shards built without processes:
    init needs no communication). Bit-exact; vocab matrices compared on their real rows."""
    cfg = get_preset("tiny-llama").replace(num_attention_heads=8, num_query_groups=8,
                                           vocab_size=200)
    full = dict(build(cfg).named_parameters())
    shards = [dict(build(cfg, ps=ParallelState.for_shapes(tp, r)).named_parameters())
              for r in range(tp)]
    for name, ref in full.items():
        p0 = shards[0][name]
        got = unshard_tensors([s[name].detach() for s in shards], p0.tensor_parallel_dim,
                              p0.partition_stride)
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert torch.equal(got[:cfg.vocab_size], ref[:cfg.vocab_size]), name
            assert torch.all(got[cfg.vocab_size:] == 0), name
        else:
            assert torch.equal(got, ref), name


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_changes_no_gradient_with_dropout_on(cfg, granularity):
    """Dropout on: recompute must replay exactly the same masks (RNG state restored), so the
    gradients are bit-identical to the run that stored its activations."""
    cfg = cfg.replace(hidden_dropout=0.1, attention_dropout=0.1)
    ids = ids_for(cfg)

    def grads(c):
        tracker = model_parallel_seed(1234, ParallelState.single())
        model = build(c, rng_tracker=tracker)
        loss = model(ids, labels=ids.roll(-1, 1)).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss0, g0 = grads(cfg)
    loss1, g1 = grads(cfg.replace(recompute_granularity=granularity))
    assert torch.equal(loss0, loss1)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    # ...and dropout is really on: a different seed gives a different loss.
    tracker = model_parallel_seed(99, ParallelState.single())
    other = build(cfg, rng_tracker=tracker)(ids, labels=ids.roll(-1, 1)).mean()
    assert not torch.equal(other.detach(), loss0)


def test_pipeline_slices_compose_to_the_full_model(cfg):
    """Stage 0 holds the embedding + layer 0, stage 1 layer 1 + norm + output layer. Names use
    global layer ids, so the same seed initializes the same weights; a tied output layer on
    the last stage starts equal to the embedding."""
    ids = ids_for(cfg)
    full = build(cfg)
    first = build(cfg, post_process=False, layer_range=(0, 1))
    last = build(cfg, pre_process=False, layer_range=(1, 2))
    assert list(first.layers) == ["0"] and list(last.layers) == ["1"]
    assert torch.equal(last.output_weight(), full.output_weight())
    hidden = first(ids)
    assert hidden.shape == (16, 2, cfg.hidden_size)
    assert torch.equal(last(hidden), full(ids))
    with pytest.raises(MegaliteError, match="layer_range"):
        GPTModel(cfg, ModelContext(ParallelState.single()), layer_range=(1, 3))


def test_sinusoidal_table_formula():
    t = sinusoidal_table(50, 16)
    pos, i = 37, 3
    assert t[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-7)
    assert t[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)),
                                                     abs=1e-7)
    cfg = get_preset("tiny").replace(position_embedding_type="sinusoidal")
    model = build(cfg)
    assert not any("position" in n for n, _ in model.named_parameters())
    assert model(ids_for(cfg)).shape == (2, 16, 1024)


def test_bad_inputs_are_clear_errors():
    cfg = get_preset("tiny")
    model = build(cfg)
    with pytest.raises(MegaliteError, match="max_position_embeddings"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(MegaliteError, match=r"\[batch, seq\]"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(MegaliteError, match="labels shape"):
        model(torch.zeros(2, 8, dtype=torch.long), labels=torch.zeros(2, 7, dtype=torch.long))
    sd = model.full_state_dict()
    sd.pop("final_norm.bias")
    with pytest.raises(MegaliteError, match="final_norm.bias"):
        model.load_full_state_dict(sd)


def test_full_state_dict_round_trip_changes_padding_only(cfg):
    model = build(cfg, seed=5)
    with pytest.raises(MegaliteError, match="labels shape"):
        model(torch.zeros(2, 8, dtype=torch.long), labels=torch.zeros(2, 7, dtype=torch.long))
    sd = model.full_state_dict()
    sd = {k: v[:cfg.vocab_size] if k.endswith(("word_embeddings.weight", "output_layer.weight"))
          else v for k, v in sd.items()}                   # unpadded, as from Hugging Face
    other = build(cfg, seed=6)
    other.load_full_state_dict(sd)
    ids = ids_for(cfg)
    assert torch.equal(other(ids), model(ids))


def test_bfloat16_model_tracks_float32(cfg):
    """Same init in bf16: the loss stays fp32 and within bf16 rounding of the fp32 model
    (bf16 keeps 8 mantissa bits, ~4e-3 relative per op; 2e-2 leaves room for a few layers)."""
    ids = ids_for(cfg)
    ref = build(cfg)(ids, labels=ids.roll(-1, 1))
    model = build(cfg, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    loss = model(ids, labels=ids.roll(-1, 1))
    assert loss.dtype == torch.float32
    assert (loss - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    assert torch.all(model(ids)[..., cfg.vocab_size:] == torch.finfo(torch.bfloat16).min)


def test_meta_build_then_materialize_equals_direct_build():
    """Build on meta (no memory), to_empty, init_weights: the same model as a direct build
    (the way large models avoid drawing weights twice)."""
    cfg = get_preset("tiny").replace(position_embedding_type="sinusoidal", vocab_size=200)
    direct = build(cfg, seed=2)
    lazy = GPTModel(cfg, ModelContext(ParallelState.single(), device="meta")).to_empty(device="cpu")
    lazy.init_weights(2)
    ids = ids_for(cfg)
    assert torch.equal(lazy(ids), direct(ids))
    # Sharding metadata survives materialization (torch makes new Parameter objects).
    ps = ParallelState.for_shapes(2, 1)
    shard = GPTModel(cfg, ModelContext(ps, device="meta")).to_empty(device="cpu")
    shard.init_weights(2)
    ref = GPTModel(cfg, ModelContext(ps))
    ref.init_weights(2)
    for (n, p), q in zip(shard.named_parameters(), ref.parameters()):
        assert (p.tensor_parallel_dim, p.partition_stride, p.sequence_parallel) == (
            q.tensor_parallel_dim, q.partition_stride, q.sequence_parallel), n
        assert torch.equal(p, q), n
