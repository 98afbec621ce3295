"""The ``--dry-run`` activation estimate's attention scores (megalite/model/memory.py): counted
only where torch's math backend keeps them, checked against torch's own backend choice and
against the bytes a real layer keeps for backward on CPU.

What is measured: the bytes of every tensor autograd saves during one layer's forward (each
storage once, parameters excluded), i.e. the activations held for backward, which is what the
Korthikanti formula counts. The transient peak inside the forward is not measured: CPU torch
has no allocator peak counter (``torch.cuda.max_memory_allocated`` has no CPU twin), and the
formula leaves transients out anyway. Saved-tensor bytes are exact and deterministic (no
timing, no allocator state).
"""
import os

import pytest
import torch
from torch.nn.attention import SDPBackend

from megalite.distributed.parallel_state import ParallelState
from megalite.model.memory import (activation_bytes_per_layer, attention_scores_note,
                                   encoder_decoder_activation_bytes, scores_stored_because)
from megalite.model.transformer import TransformerLayer
from megalite.parallel.context import ModelContext
from megalite.training.dry_run import plan_run
from megalite.training.prepare import parse_train_args

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "megalite", "configs")


def _config(name="tiny-gpt", *extra):
    return parse_train_args(["--config", os.path.join(CONFIGS, name + ".yaml"), "--mock-data",
                             *extra])


# ---- the rule against torch's own choice on CPU -------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mask,mask_grad", [(None, False), ("bool", False), ("float", False),
                                            ("float", True)])
@pytest.mark.parametrize("groups", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rule_is_torchs_backend_choice(dropout, mask, mask_grad, groups, dtype):
    """scores_stored_because(..., "cpu") is None exactly when torch picks its CPU flash kernel
    for megalite's call (grad on, GQA via enable_gqa, the model's mask kinds)."""
    prec = ["--bf16"] if dtype == torch.bfloat16 else []
    cfg = _config("tiny-llama", "--attention-dropout", str(dropout), "--num-query-groups",
                  str(groups), *prec)
    b, a, s, d = 2, 4, 64, 16
    q = torch.randn(b, a, s, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, groups, s, d, dtype=dtype, requires_grad=True) for _ in range(2))
    m = None
    if mask == "bool":
        m = torch.ones(b, 1, 1, s, dtype=torch.bool)
    elif mask == "float":
        m = torch.zeros(1, a, s, s, dtype=dtype, requires_grad=mask_grad)
    chosen = torch._fused_sdp_choice(q, k, v, m, dropout, m is None, enable_gqa=groups != a)
    why = scores_stored_because(cfg, "cpu", mask=m is not None, mask_grad=mask_grad)
    assert chosen in (int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.MATH))
    assert (why is None) == (chosen == int(SDPBackend.FLASH_ATTENTION)), why


# ---- the estimate's numbers ----------------------------------------------------------------
def test_fused_cases_drop_the_score_term():
    s, b, h, a, t = 64, 4, 64, 4, 2                     # tiny-gpt, TP 2, fp32 (x2)
    base = s * b * h * (10 + 24 / t) * 2
    scores = s * b * h * 5 * a * s / (h * t) * 2
    cfg = _config("tiny-gpt", "--tensor-model-parallel-size", "2")
    for device in ("cpu", "cuda"):     # no mask, no dropout: CPU flash / CUDA efficient (fp32)
        assert activation_bytes_per_layer(cfg, t, device) == base
        assert "not stored: fused SDPA on " + device in attention_scores_note(cfg, device)
    drop = _config("tiny-gpt", "--tensor-model-parallel-size", "2", "--attention-dropout", "0.1")
    assert activation_bytes_per_layer(drop, t, "cpu") == base + scores       # math backend
    assert attention_scores_note(drop, "cpu") == \
        "attention scores counted: SDPA math backend (attention dropout 0.1 on cpu)"
    assert activation_bytes_per_layer(drop, t, "cuda") == base              # dropout fused
    sel = _config("tiny-gpt", "--attention-dropout", "0.1", "--recompute-activations")
    assert activation_bytes_per_layer(sel, 1, "cpu") == s * b * h * 34 * 2
    assert attention_scores_note(sel, "cpu") == \
        "attention scores not stored: selective recompute"


def test_cuda_math_cases_keep_the_score_term():
    s, b, h, a = 64, 4, 64, 4                           # tiny-llama: 4 heads, 2 groups, d 16
    base, scores = s * b * h * 34, s * b * h * 5 * a * s / h
    gqa_fp32 = _config("tiny-llama")     # flash needs bf16/fp16; efficient: no GQA (2.11)
    assert activation_bytes_per_layer(gqa_fp32, 1, "cuda") == (base + scores) * 2
    assert "grouped-query heads with fp32 on cuda" in attention_scores_note(gqa_fp32, "cuda")
    assert activation_bytes_per_layer(_config("tiny-llama", "--bf16"), 1, "cuda") == base
    # BERT's padding mask rules flash out; head dim 12 is no multiple of 8 for efficient
    odd = _config("tiny-bert", "--bf16", "--hidden-size", "48", "--ffn-hidden-size", "192")
    assert scores_stored_because(odd, "cuda", mask=True) == "head dim 12 with a mask on cuda"
    assert activation_bytes_per_layer(odd, 1, "cuda") == s * 4 * 48 * (34 + 5 * a * s / 48)
    assert activation_bytes_per_layer(odd, 1, "cpu") == s * 4 * 48 * 34


def test_t5_counts_self_attention_scores_where_the_bias_forces_math():
    c = _config("tiny-t5", "--decoder-seq-length", "32", "--tensor-model-parallel-size", "2")
    s, d, b, h, a, t = 128, 32, 4, 64, 4, 2             # tiny-t5.yaml, TP 2, fp32 (x2)
    layer = lambda n, sc: n * b * h * (10 + 24 / t + sc * 5 * a * n / (h * t)) * 2  # noqa
    cross = (d * b * h * 5 + 4 * d * b * h / t + 4 * s * b * h / t) * 2
    # CPU: the learned relative bias (a mask requiring grad) takes the math backend; the
    # cross-attention's padding mask does not
    assert encoder_decoder_activation_bytes(c, t, "cpu") * 4 == pytest.approx(
        4 * layer(s, 1) + 4 * (layer(d, 1) + cross), rel=1e-12)
    assert attention_scores_note(c, "cpu") == (
        "self-attention scores counted: SDPA math backend (learned position bias on cpu); "
        "cross-attention scores not stored: fused SDPA on cpu")
    assert encoder_decoder_activation_bytes(c, t, "cuda") * 4 == pytest.approx(
        4 * layer(s, 0) + 4 * (layer(d, 0) + cross), rel=1e-12)


def test_context_parallel_ring_keeps_no_scores():
    cfg = _config("tiny-gpt", "--context-parallel-size", "2")
    s, b, h = 64, 4, 64
    assert plan_run(cfg, 2, device="cuda").stages[0].memory_bytes["activations"] == \
        4 * s * b * h * 34 * 2 / 2                          # 4 layers, fp32, 1/CP
    assert attention_scores_note(cfg) == "attention scores not stored: ring attention"


# ---- against a real layer on CPU -----------------------------------------------------------
def _saved_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves in ``layer(x)``, each storage once, parameters
    excluded (the input's storage included: the formula counts the layer input)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()                                # the saved graph really is usable
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_estimate_is_closer_to_a_real_layer(dropout):
    """One GPT layer (tiny-gpt's recipe, fp32, s = 256 so the scores would dominate) on CPU:
    the estimate planned for CPU is closer to the bytes the layer keeps for backward than the
    other choice (old formula with the scores when fused; without them under dropout, where
    the math backend keeps softmax, mask and dropped probabilities), and within 20 % of it
    (the formula's 34 s*b*h counts masks of the hidden dropout, here off, and lumps the MLP)."""
    torch.manual_seed(0)
    s, b = 256, 2
    cfg = _config("tiny-gpt", "--seq-length", "256", "--max-position-embeddings", "256",
                  "--micro-batch-size", "2", "--attention-dropout", str(dropout))
    layer = TransformerLayer(cfg.model, ModelContext(ParallelState.single()))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer.train()
    x = torch.randn(s, b, cfg.model.hidden_size, requires_grad=True)
    measured = _saved_bytes(layer, x)
    planned = activation_bytes_per_layer(cfg, 1, "cpu")
    h, a = cfg.model.hidden_size, cfg.model.num_attention_heads
    term = s * b * h * 5 * a * s / h * 2                # the score term, fp32
    other = planned + term if dropout == 0 else planned - term
    assert abs(planned - measured) < abs(other - measured), (planned, other, measured)
    assert abs(planned - measured) <= 0.2 * measured, (planned, measured)
