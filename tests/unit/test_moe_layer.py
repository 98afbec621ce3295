"""The MoE layer in one process: router (against megatron-core's routing and loss functions),
the local dispatcher, grouped against per-expert expert compute, the layer against a per-token
reference, the router losses' gradients, capacity dropping and the statistics.

Tolerances: the routing weights and losses are the same fp32 formulas as megatron-core's up to
the order of a few additions (1e-6 relative); the layer against the per-token reference adds
the experts' matmuls in another grouping (1e-5 relative to the largest output, fp32); grouped
against the loop is the same GEMMs in other kernels (1e-5).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig
from megalite.model.gpt import GPTModel
from megalite.model.moe import MoELayer, set_aux_loss_scale
from megalite.model.moe_config import parse_layer_freq
from megalite.model.moe_dispatch import LocalDispatcher
from megalite.model.moe_stats import attach, collect
from megalite.model.router import route, topk_stable
from megalite.parallel.context import ModelContext
from megalite.parallel.random import checkpoint

from megatron.core.transformer.moe import moe_utils as mcore


def close(a, b, rel):
    scale = max(b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() <= rel * scale


def config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100,
                ffn_hidden_size=48, activation="swiglu", add_bias_linear=False,
                normalization="RMSNorm", position_embedding_type="rope", num_experts=4,
                moe_router_topk=2)
    base.update(kw)
    return TransformerConfig(**base)


def layer(cfg, seed=0):
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(seed)
    return model.layers["0"].mlp


def test_tie_break_is_the_lower_expert_id():
    scores = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]])
    values, idx = topk_stable(scores, 2)
    assert idx.tolist() == [[0, 1], [1, 2]]
    r = route(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 3)
    assert r.expert_ids.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_routing_equals_megatron_core(pre_softmax):
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    r = route(logits, 2, pre_softmax=pre_softmax)
    ref_probs, ref_map = mcore.topk_routing_with_score_function(logits, 2,
                                                                use_pre_softmax=pre_softmax)
    dense = torch.zeros(64, 8).scatter(1, r.expert_ids, r.probs)
    assert torch.equal(dense > 0, ref_map)
    assert close(dense, ref_probs, 1e-6)
    assert torch.allclose(r.probs.sum(-1), torch.ones(64)) != pre_softmax


def test_losses_equal_megatron_core():
    g = torch.Generator().manual_seed(5)
    s, b, e, k = 16, 3, 8, 2
    logits = torch.randn(s * b, e, generator=g)
    r = route(logits, k, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    scores = torch.softmax(logits, -1)
    ref_aux = mcore.switch_load_balancing_loss_func(scores, r.tokens_per_expert, s * b, k, e, 0.01)
    assert close(r.aux_loss, ref_aux, 1e-6)
    assert close(r.z_loss, mcore.z_loss_func(logits, 0.001), 1e-6)
    # sequence-level: megatron-core's formula (the batch folded into the experts, / b)
    seq = route(logits, k, load_balancing_type="seq_aux_loss", aux_loss_coeff=0.01,
                seq_batch=(s, b))
    counts = torch.zeros(s * b, e).scatter(1, seq.expert_ids, 1.0).view(s, b * e).sum(0)
    ref = mcore.switch_load_balancing_loss_func(scores.view(s, b * e), counts, s, k, e, 0.01) / b
    assert close(seq.aux_loss, ref, 1e-6)


def test_capacity_drops_the_lowest_scores_per_expert():
    # 4 tokens all prefer expert 0 (k=1, E=2): capacity ceil(1.0 * 4 * 1 / 2) = 2
    logits = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    r = route(logits, 1, capacity_factor=1.0)
    assert r.expert_ids.view(-1).tolist() == [0, -1, 0, -1]
    assert r.probs.view(-1)[1] == 0 and r.tokens_per_expert.tolist() == [4, 0]


def test_local_dispatcher_groups_by_expert_and_combines_in_slot_order():
    hidden = torch.arange(12.0).view(4, 3)
    ids = torch.tensor([[1, 0], [0, 2], [2, 1], [-1, 0]])
    probs = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.6, 0.4], [0.0, 1.0]])
    d = LocalDispatcher(3)
    rows, counts = d.dispatch(hidden, probs, ids)
    assert counts.tolist() == [3, 2, 2]
    # expert 0: tokens 0, 1, 3; expert 1: tokens 0, 2; expert 2: tokens 1, 2
    assert torch.equal(rows, hidden[[0, 1, 3, 0, 2, 1, 2]])
    out = d.combine(rows * 2)
    ref = torch.stack([2 * hidden[0], 2 * hidden[1], 2 * hidden[2], 2 * hidden[3]])
    assert torch.equal(out, ref)


def reference_moe(mlp, x, cfg):
    """Per token: softmax, top-k, each selected expert's SwiGLU MLP weighted (+ shared)."""
    out = torch.zeros_like(x)
    w_r = mlp.router.weight
    for t in range(x.shape[0]):
        scores = torch.softmax(x[t] @ w_r.T, -1)
        top, idx = torch.sort(scores, descending=True, stable=True)
        top, idx = top[:cfg.moe_router_topk], idx[:cfg.moe_router_topk]
        if not cfg.moe_router_pre_softmax:
            top = top / top.sum()
        for p, e in zip(top, idx.tolist()):
            ex = getattr(mlp.experts, str(e))
            gate, up = (ex.linear_fc1.weight @ x[t]).chunk(2)
            out[t] += p * (ex.linear_fc2.weight @ (F.silu(gate) * up))
        if hasattr(mlp, "shared_experts"):
            sh = mlp.shared_experts
            gate, up = (sh.linear_fc1.weight @ x[t]).chunk(2)
            y = sh.linear_fc2.weight @ (F.silu(gate) * up)
            if hasattr(sh, "gate_weight"):
                y = y * torch.sigmoid(sh.gate_weight[0] @ x[t])
            out[t] += y
    return out


@pytest.mark.parametrize("kw", [{}, {"moe_router_pre_softmax": True, "moe_router_topk": 3},
                                {"moe_shared_expert_intermediate_size": 40,
                                 "moe_shared_expert_gate": True}])
def test_layer_equals_per_token_reference_and_grouped_equals_loop(kw):
    cfg = config(**kw)
    mlp = layer(cfg)
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = mlp(x)
    assert y.shape == x.shape
    assert close(y.view(-1, 32), reference_moe(mlp, x.detach().view(-1, 32), cfg), 1e-5)
    assert mlp.experts._grouped_ok(x.view(-1, 32))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *mlp.parameters()], g)
    mlp.experts.grouped = False
    y2 = mlp(x)
    grads2 = torch.autograd.grad(y2, [x, *mlp.parameters()], g)
    assert close(y2, y, 1e-5)
    for a, b in zip(grads2, grads):
        assert close(a, b, 1e-5)


def test_router_losses_are_backpropagated_with_the_loss_scale():
    cfg = config(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    mlp = layer(cfg)
    x = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(2))
    w = mlp.router.weight
    try:
        set_aux_loss_scale(0.25)
        (g_layer,) = torch.autograd.grad(mlp(x).sum() * 0.25, [w])
    finally:
        set_aux_loss_scale(1.0)
    # the same losses computed outside: (sum(y) + aux + z) * 0.25
    r = route(x.view(-1, 32) @ w.T, 2, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    mlp.eval()                      # no losses attached in eval
    y = mlp(x)
    (g_ref,) = torch.autograd.grad((y.sum() + r.aux_loss + r.z_loss) * 0.25, [w])
    assert close(g_layer, g_ref, 1e-5)
    assert r.aux_loss > 0 and r.z_loss > 0


def test_stats_count_each_forward_once_with_recompute():
    cfg = config(moe_aux_loss_coeff=0.1)
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(0)
    stats = attach([model])
    assert [layer for layer, _ in stats] == [0, 1]
    mlp = model.layers["0"].mlp
    x = torch.randn(8, 2, 32, requires_grad=True)
    checkpoint(mlp, None, x).sum().backward()      # forward + recompute in backward
    mlp(x).sum().backward()
    out = collect(stats, cfg.num_layers, 4, num_microbatches=1, ps=ParallelState.single(),
                  device="cpu")
    # 2 forwards of 16 tokens x k=2 in layer 0 (layer 1 never ran): 64 assignments / 2 iters
    assert sum(out["moe_expert_tokens"]) == 32.0
    assert out["moe_aux_loss"] > 0 and out["moe_max_load"] >= 1.0
    assert stats[0][1].forwards == 0          # reset


def test_layer_freq_and_bad_configs():
    assert parse_layer_freq("2") == 2
    assert parse_layer_freq("([1]*2+[0])*2") == [1, 1, 0, 1, 1, 0]
    cfg = config(num_layers=4, moe_layer_freq=[0, 1, 0, 1])
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert [config(num_layers=4, moe_layer_freq=2).is_moe_layer(i) for i in range(4)] == \
        [True, False, True, False]
    model = GPTModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    assert isinstance(model.layers["1"].mlp, MoELayer)
    assert not isinstance(model.layers["0"].mlp, MoELayer)
    for bad, match in [({"moe_router_topk": 5}, "moe_router_topk"),
                       ({"add_bias_linear": True}, "disable-bias-linear"),
                       ({"moe_layer_freq": [1, 0, 1]}, "moe_layer_freq"),
                       ({"moe_router_load_balancing_type": "sinkhorn"}, "load_balancing"),
                       ({"moe_shared_expert_gate": True}, "shared_expert_gate")]:
        with pytest.raises(MegaliteError, match=match):
            config(**bad)
    with pytest.raises(ValueError):
        parse_layer_freq("__import__('os')")
