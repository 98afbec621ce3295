"""Model config validation, presets (parameter counts, per-rank shapes) and the FLOPs formula.

Everything here is exact integer arithmetic: counts and shapes must match to the unit.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model import PRESETS, TransformerConfig, flops_per_iteration, get_preset, padded_vocab_size
from megalite.model.gpt import GPTModel
from megalite.parallel.context import ModelContext

LLAMA2_7B_PARAMS = 6_738_415_616   # LLaMA-2-7B as published / as LlamaForCausalLM counts it
LLAMA31_8B_PARAMS = 8_030_261_248  # Llama-3.1-8B as published


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- config --------------------------------------------------------------------------------
def test_padded_vocab_size():
    assert padded_vocab_size(32000, 1) == 32000          # 250 * 128
    assert padded_vocab_size(32000, 2) == 32000          # 125 * 256
    assert padded_vocab_size(32000, 8) == 32768          # 32 * 1024
    assert padded_vocab_size(50257, 1) == 50304
    assert padded_vocab_size(1, 4, multiple=1) == 4
    with pytest.raises(MegaliteError):
        padded_vocab_size(0, 1)


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=65), "hidden_size"),
    (dict(num_query_groups=3), "num_query_groups"),
    (dict(position_embedding_type="alibi"), "position_embedding_type"),
    (dict(normalization="BatchNorm"), "normalization"),
    (dict(activation="tanh"), "activation"),
    (dict(recompute_granularity="some"), "recompute_granularity"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(num_layers=0), "num_layers"),
    (dict(seq_length=4096), "seq_length"),
    (dict(rope_scaling="yarn"), "rope_scaling"),
    (dict(rope_scaling="llama3", rope_scaling_factor=0.0), "rope_scaling_factor"),
    (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), "rope_low_freq_factor"),
    (dict(rope_scaling="llama3", rope_original_max_position_embeddings=0),
     "rope_original_max_position_embeddings must be a positive integer"),
])
def test_config_rejects_bad_fields_naming_them(changes, field):
    with pytest.raises(MegaliteError, match=field):
        get_preset("tiny-llama").replace(**changes)


def test_config_rejects_layouts_that_do_not_split():
    cfg = get_preset("tiny-llama")                       # 4 heads, 2 groups
    cfg.validate_parallel(2)
    with pytest.raises(MegaliteError, match="num_query_groups=2 is not divisible by 4"):
        cfg.validate_parallel(4)
    with pytest.raises(MegaliteError, match="num_query_groups"):
        GPTModel(cfg, ModelContext(ParallelState.for_shapes(4), device="meta"))
    sp = cfg.replace(sequence_parallel=True)
    with pytest.raises(MegaliteError, match="sequence length"):
        sp.validate_parallel(2, seq_length=63)


def test_presets_are_distinct_valid_configs():
    assert PRESETS == ["tiny", "tiny-llama", "gpt2-small", "1b", "llama2-7b", "llama3.1-8b",
                       "mixtral-8x7b", "tiny-moe", "qwen3-moe-tiny", "qwen3-30b-a3b",
                       "tiny-bert", "bert-base", "bert-large", "tiny-t5", "t5-small", "t5-base",
                       "transformer-base"]
    for name in PRESETS:
        assert isinstance(get_preset(name), TransformerConfig)
    assert get_preset("tiny") is not get_preset("tiny")   # fresh objects, safe to mutate
    with pytest.raises(MegaliteError, match="unknown model preset 'gpt5'"):
        get_preset("gpt5")


# ---- parameter counts on the meta device ------------------------------------------------------
def test_llama2_7b_has_exactly_its_parameter_count_on_meta():
    cfg = get_preset("llama2-7b")
    model = GPTModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    # At TP=1 the vocabulary needs no padding (32000 = 250 * 128), so the megalite model holds
    # exactly LLaMA-2-7B's parameters.
    assert model.padded_vocab == 32000
    assert _numel(model) == LLAMA2_7B_PARAMS
    assert all(p.is_meta for p in model.parameters())


def test_llama31_8b_has_exactly_its_parameter_count_and_hf_config():
    cfg = get_preset("llama3.1-8b")
    model = GPTModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    assert model.padded_vocab == 128256 and _numel(model) == LLAMA31_8B_PARAMS
    pytest.importorskip("transformers")
    from megalite.convert import config_to_hf
    hf = config_to_hf(cfg)           # what Meta's config.json says, field by field
    assert (hf.num_key_value_heads, hf.intermediate_size, hf.max_position_embeddings) == \
        (8, 14336, 131072)
    assert hf.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}


def test_rope_scaling_needs_rope_positions():
    with pytest.raises(MegaliteError, match="needs position_embedding_type 'rope'"):
        get_preset("tiny").replace(rope_scaling="linear")


def test_llama2_7b_per_rank_shapes_under_tp8():
    cfg = get_preset("llama2-7b")
    h, f, d = 4096, 11008, 128
    total = 0
    for r in range(8):
        model = GPTModel(cfg, ModelContext(ParallelState.for_shapes(8, r), device="meta"))
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert model.padded_vocab == 32768                       # 32000 -> multiple of 1024
        assert shapes["embedding.word_embeddings.weight"] == (4096, h)
        assert shapes["output_layer.weight"] == (4096, h)
        # 32 heads / 8 = 4 heads per rank; MHA: 4 groups, each q + k + v -> 3 * 4 * 128 rows
        assert shapes["layers.0.attention.linear_qkv.weight"] == (3 * 4 * d, h)
        assert shapes["layers.31.attention.linear_proj.weight"] == (h, 4 * d)
        assert shapes["layers.5.mlp.linear_fc1.weight"] == (2 * f // 8, h)   # [gate_r; up_r]
        assert shapes["layers.5.mlp.linear_fc2.weight"] == (h, f // 8)
        assert shapes["layers.5.input_norm.weight"] == (h,)
        assert shapes["final_norm.weight"] == (h,)
        assert "layers.0.attention.linear_qkv.bias" not in shapes
        for n, p in model.named_parameters():
            total += p.numel() if p.tensor_parallel_dim is not None or r == 0 else 0
    # Summing shards (replicated norms once) gives the 7B count plus the 768 padding rows of
    # the embedding and of the untied output layer, which TP=8 needs and HF does not have.
    assert total == LLAMA2_7B_PARAMS + 2 * (32768 - 32000) * h


@pytest.mark.parametrize("name, expected", [
    ("gpt2-small", 124_439_808),      # GPT2LMHeadModel's count (tied lm_head counted once)
    ("1b", 1_100_048_384),            # TinyLlama-1.1B's count
])
def test_preset_parameter_counts_without_padding(name, expected):
    cfg = get_preset(name)
    model = GPTModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    padding = (model.padded_vocab - cfg.vocab_size) * cfg.hidden_size
    padding *= 1 if cfg.tied_embeddings else 2
    assert _numel(model) - padding == expected


def test_gqa_shapes_under_tp():
    cfg = get_preset("1b")                                   # 32 heads, 4 groups, d = 64
    model = GPTModel(cfg, ModelContext(ParallelState.for_shapes(4, 3), device="meta"))
    qkv = model.layers["0"].attention.linear_qkv.weight
    assert tuple(qkv.shape) == ((32 + 2 * 4) * 64 // 4, 2048)    # one group (8 q + k + v)


# ---- FLOPs ---------------------------------------------------------------------------------
def test_flops_hand_computed_small_case():
    # L=2, h=8, a=2, g=1, d=4, f=16, V=10, SwiGLU; B=3 sequences of s=4 tokens.
    cfg = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=1,
                    kv_channels=4, ffn_hidden_size=16, vocab_size=10, max_position_embeddings=4,
                    position_embedding_type="rope", normalization="RMSNorm", activation="swiglu")
    qkv = 2 * 8 * (2 + 2 * 1) * 4         # 256: q (2 heads) + k, v (1 group) of width 4
    attn = 2 * 2 * 4 * 4                  # 64: causal half of 2 bmm x 2 flop x a*d*s
    proj = 2 * (2 * 4) * 8                # 128
    mlp = 3 * 2 * 8 * 16                  # 768: gate, up, down
    logits = 2 * 8 * 10                   # 160
    per_token = 2 * (qkv + attn + proj + mlp) + logits
    assert per_token == 2592
    assert flops_per_iteration(cfg, global_batch_size=3, seq_length=4) == 3 * 3 * 4 * 2592
    gelu = cfg.replace(activation="gelu", position_embedding_type="learned_absolute")
    assert flops_per_iteration(gelu, 3, 4) == 3 * 3 * 4 * (2592 - 2 * 2 * 8 * 16)
    with pytest.raises(MegaliteError):
        flops_per_iteration(cfg, 0, 4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_flops_gemm_terms_match_torch_flop_counter(preset):
    """Independent check of the GEMM terms: torch's FlopCounterMode counts every matmul of a
    real forward+backward. It does not see CPU SDPA, so the attention core is subtracted from
    the formula; the output layer runs on the padded vocabulary, so that difference is added."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(seed=1)
    b, s = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).sum().backward()
    a, d, h, L = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size, cfg.num_layers
    expected = (flops_per_iteration(cfg, b, s)
                - 3 * b * s * L * 2 * a * d * s                         # attention core
                + 3 * b * s * 2 * h * (model.padded_vocab - cfg.vocab_size))
    assert counter.get_total_flops() == expected
