"""Parity with transformers' ``T5ForConditionalGeneration`` (v1.0: ReLU, tied and scaled output;
v1.1: gated GELU, untied), through the one name map (:mod:`megalite.convert.hf_t5`).

Tolerance: 1e-4 absolute on logits of scale ~1-10 (float32), the issue's bound. The math is
the same; the two differ in kernels and in one cast (HF's T5 norm computes the variance in
float32 whatever the dtype), so they agree to float32 rounding amplified through the layers:
with the hidden matrices drawn N(0, 0.1) the difference is ~1e-5 (and 1e-12 in float64 without
that cast, measured while writing the map). The embedding is N(0, 1) as T5 initializes it (the
v1.0 output layer reads it after scaling by h^-0.5). T5 does not scale its attention scores by
1/sqrt(d), so the N(0, 0.2) of the GPT parity tests would make scores, and the rounding, d times
larger; 0.1 keeps the logits O(1-10), far above any mapping error (a swapped head moves them by
O(1)). Padding masks on both sides; logits compared where the decoder has a token. The models:
``hf_common.hf_t5_model``.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from hf_common import hf_t5_model, megalite_config_of, t5_batch as batch

from megalite.convert import config_from_hf, hf_t5
from megalite.convert.hf_t5 import config_to_hf, from_hf, to_hf
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.model import get_preset
from megalite.model.encoder_decoder import EncoderDecoderModel
from megalite.parallel.context import ModelContext

TOL = 1e-4
V = 300
VERSIONS = ("v1.0", "v1.1")


def assert_logits_match(ours, hf, cfg, dec_mask):
    enc, dec, enc_mask, _ = batch()
    with torch.no_grad():
        theirs = hf(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec,
                    decoder_attention_mask=dec_mask).logits
        mine = ours(enc, dec, enc_mask=enc_mask, dec_mask=dec_mask)
    assert mine.shape[-1] == cfg.padded_vocab(1)
    assert torch.all(mine[..., V:] == torch.finfo(mine.dtype).min)
    assert theirs.abs().max() > 1.0                       # a sensitive comparison
    real = dec_mask.bool()
    err = (mine[..., :V] - theirs).abs()[real].max().item()
    assert err <= TOL, f"max |megalite - HF| = {err}"


@pytest.mark.parametrize("version", VERSIONS)
def test_hf_to_megalite_logits_match(version):
    hf = hf_t5_model(version)
    cfg = megalite_config_of(hf)
    assert cfg.tied_embeddings == cfg.scale_decoder_outputs == (version == "v1.0")
    ours = EncoderDecoderModel(cfg, ModelContext(ParallelState.single())).eval()
    ours.load_full_state_dict(from_hf(hf.state_dict(), cfg))
    assert_logits_match(ours, hf, cfg, batch()[3])
    assert_logits_match(ours, hf, cfg, torch.ones(2, 25, dtype=torch.long))


@pytest.mark.parametrize("version", VERSIONS)
def test_megalite_to_hf_logits_match(version):
    cfg = megalite_config_of(hf_t5_model(version))
    ours = EncoderDecoderModel(cfg, ModelContext(ParallelState.single())).eval()
    ours.init_weights(seed=7)
    with torch.no_grad():    # larger than the 0.02 init, so that the logits are O(1)
        for name, p in ours.named_parameters():
            if p.dim() == 2:
                p.mul_(1.0 / 0.02 if "word_embeddings" in name or "output_layer" in name
                       else 5.0)
    hf_cfg = config_to_hf(cfg)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    if not cfg.tied_embeddings:
        hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.shared.weight))
    missing, unexpected = hf.load_state_dict(to_hf(ours.full_state_dict(), cfg), strict=True)
    assert not missing and not unexpected
    assert (hf.lm_head.weight is hf.shared.weight) == cfg.tied_embeddings
    assert_logits_match(ours, hf, cfg, batch()[3])


@pytest.mark.parametrize("version", VERSIONS)
def test_state_dict_round_trip_is_exact(version):
    hf = hf_t5_model(version, seed=3)
    hf_state = hf.state_dict()
    cfg = megalite_config_of(hf)
    back = to_hf(from_hf(hf_state, cfg), cfg)
    assert set(back) == set(hf_state)
    for k, v in hf_state.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("version", VERSIONS)
def test_config_round_trip(version):
    cfg = megalite_config_of(hf_t5_model(version))
    names = {"shared.weight"} | ({"lm_head.weight"} if not cfg.tied_embeddings else set())
    assert config_from_hf(config_to_hf(cfg), names) == cfg


def test_name_map_covers_every_parameter_once():
    for version in VERSIONS:
        hf = hf_t5_model(version)
        cfg = megalite_config_of(hf)
        maps = hf_t5.param_mappings(cfg)
        ours = [n for n, _ in EncoderDecoderModel(
            cfg, ModelContext(ParallelState.single(), device="meta")).named_parameters()]
        assert sorted(m.megalite for m in maps) == sorted(ours)
        hf_names = [n for m in maps for n in m.hf]
        assert len(hf_names) == len(set(hf_names))
        copies = set(hf_t5.TIED_COPIES) | ({"lm_head.weight"} if cfg.tied_embeddings else set())
        assert set(hf_names) == set(hf.state_dict()) - copies


def test_relative_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    from megalite.model.positions import relative_position_buckets
    q, k = torch.arange(300), torch.arange(300)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (16, 50)):
            ours = relative_position_buckets(q, k, bidirectional=bidirectional,
                                             num_buckets=buckets, max_distance=distance)
            theirs = T5Attention._relative_position_bucket(
                k[None, :] - q[:, None], bidirectional=bidirectional, num_buckets=buckets,
                max_distance=distance)
            assert torch.equal(ours, theirs)
            assert ours.max() == buckets - 1          # the far bucket is reached


@pytest.mark.parametrize("preset, expected", [("t5-small", 60_506_624),
                                              ("t5-base", 222_903_552)])
def test_presets_have_the_hf_parameter_counts(preset, expected):
    cfg = get_preset(preset)
    hf_cfg = config_to_hf(cfg)
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == expected     # shared counted once
    ours = EncoderDecoderModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    assert ours.padded_vocab == cfg.vocab_size == 32128                # 251 * 128: no padding
    assert sum(p.numel() for p in ours.parameters()) == expected
    # the shapes HF's released configs state
    assert (hf_cfg.d_model, hf_cfg.d_ff, hf_cfg.num_heads, hf_cfg.d_kv, hf_cfg.num_layers,
            hf_cfg.feed_forward_proj, hf_cfg.scale_decoder_outputs) == \
        ((512, 2048, 8, 64, 6, "relu", True) if preset == "t5-small"
         else (768, 3072, 12, 64, 12, "relu", True))


def test_unsupported_variants_are_refused():
    with pytest.raises(MegaliteError, match="feed_forward_proj='gated-silu' is not supported"):
        config_from_hf(transformers.T5Config(feed_forward_proj="gated-silu"))
    with pytest.raises(MegaliteError, match="no exact Hugging Face counterpart"):
        to_hf({}, get_preset("transformer-base"))
    cfg = get_preset("tiny-t5").replace(add_bias_linear=True)
    with pytest.raises(MegaliteError, match="T5 conversion needs no biases"):
        config_to_hf(cfg)
