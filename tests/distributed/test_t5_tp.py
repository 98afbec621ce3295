"""Tensor (and sequence) parallel encoder-decoder models equal the unsharded model, and Hugging
Face T5 weights go into a TP=2 model and back bit for bit: real gloo process groups.

Recipes: T5 v1.1 (gated GELU, untied), T5 v1.0 (ReLU, tied, scaled outputs) and the original
Transformer (sinusoidal, post-norm, biases), each with and without sequence parallelism, on
padded batches (source and target padding masks). Vocabulary 200 pads to 256 at TP=2 and 512 at
TP=4, where whole vocabulary shards are padding.

Tolerance: 1e-5 relative, max|TP - ref| <= 1e-5 * max|ref| per tensor (float32), as for GPT
(tests/distributed/test_model_tp.py): tensor parallelism only changes summation order. Every
gradient must be nonzero, so the comparison cannot pass vacuously. The HF round trip is
bitwise (sharding and unsharding copy values); the logits against HF within 1e-4 as in
tests/integration/test_hf_t5.py (the same models, hf_common.hf_t5_model).
"""
from __future__ import annotations

import pytest
import torch

import tp_common
from harness import DistributedWorkers
from tp_common import gathered_results

from megalite.distributed.parallel_state import ParallelState
from megalite.model import get_preset
from megalite.model.encoder_decoder import EncoderDecoderModel
from megalite.parallel.context import ModelContext

REL = 1e-5
B, T, S, SEED = 2, 16, 8, 11
_T5 = get_preset("tiny-t5").replace(vocab_size=200, seq_length=None, decoder_seq_length=None)
RECIPES = {
    "t5-v1.1": _T5,
    "t5-v1.0": _T5.replace(activation="relu", untie_embeddings_and_output_weights=False,
                           scale_decoder_outputs=True, decoder_num_layers=3),
    "transformer": get_preset("transformer-base").replace(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
        vocab_size=200, max_position_embeddings=64, seq_length=None, decoder_seq_length=None),
}
CASES = [(name, sp) for name in RECIPES for sp in (False, True)]


def batch(cfg):
    g = torch.Generator().manual_seed(5)
    enc = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    dec = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    enc_mask = torch.ones(B, T, dtype=torch.long)
    enc_mask[1, 11:] = 0
    dec_mask = torch.ones(B, S, dtype=torch.long)
    dec_mask[0, 6:] = 0
    return enc, dec, dec.roll(-1, dims=1), enc_mask, dec_mask


def run_case(cfg, ps):
    """Forward + backward on one rank; returns full (gathered) logits, loss and grads."""
    model = EncoderDecoderModel(cfg, ModelContext(ps))
    model.init_weights(SEED)
    enc, dec, labels, enc_mask, dec_mask = batch(cfg)
    logits = model(enc, dec, enc_mask=enc_mask, dec_mask=dec_mask)       # [b, s, Vp/tp]
    loss = model(enc, dec, labels, enc_mask=enc_mask, dec_mask=dec_mask)
    (loss * dec_mask).sum().backward()
    return gathered_results(model, logits, loss, ps)


def worker_all_cases(tp):
    ps = ParallelState.build(tensor_model_parallel_size=tp)
    out = {key: run_case(RECIPES[key[0]].replace(sequence_parallel=key[1]), ps)
           for key in CASES}
    return out if ps.rank == 0 else {k: v["loss"] for k, v in out.items()}


def worker_hf_round_trip(tp):
    """HF T5 (v1.0 and v1.1) -> megalite TP model -> gathered -> HF: bitwise; logits vs HF."""
    from hf_common import hf_t5_model, megalite_config_of, t5_batch

    from megalite.convert.hf_t5 import from_hf, to_hf
    ps = ParallelState.build(tensor_model_parallel_size=tp)
    out = {}
    for version in ("v1.0", "v1.1"):
        hf = hf_t5_model(version)
        cfg = megalite_config_of(hf)
        model = EncoderDecoderModel(cfg, ModelContext(ps)).eval()
        model.load_full_state_dict(from_hf(hf.state_dict(), cfg))
        back = to_hf(model.full_state_dict(), cfg)
        exact = set(back) == set(hf.state_dict()) and all(
            torch.equal(back[k], v) for k, v in hf.state_dict().items())
        enc, dec, enc_mask, dec_mask = t5_batch()
        with torch.no_grad():
            local = model(enc, dec, enc_mask=enc_mask, dec_mask=dec_mask)
            ref = hf(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec,
                     decoder_attention_mask=dec_mask).logits
        parts = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(parts, local.contiguous(), group=ps.tp_group)
        ours = torch.cat(parts, dim=-1)[..., :cfg.vocab_size]
        err = (ours - ref).abs()[dec_mask.bool()].max().item()
        out[version] = (exact, err, ref.abs().max().item())
    return out


@pytest.fixture(scope="module")
def references():
    torch.set_num_threads(1)
    return {key: run_case(RECIPES[key[0]].replace(sequence_parallel=key[1]),
                          ParallelState.single()) for key in CASES}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_process(tp, references):
    with DistributedWorkers(tp) as workers:
        results = workers.run(worker_all_cases, tp)
        rank0 = results[0]
        for key, ref in references.items():
            cfg = RECIPES[key[0]]
            got = rank0[key]
            assert got["logits"].shape[-1] == cfg.padded_vocab(tp)
            tp_common.assert_matches_reference(got, ref, cfg.vocab_size, key, REL,
                                               real=batch(cfg)[4].bool())
            for r in range(1, tp):
                assert torch.equal(results[r][key], got["loss"]), f"{key} loss on rank {r}"
        if tp == 2:
            for per_rank in workers.run(worker_hf_round_trip, tp):
                for version, (exact, err, scale) in per_rank.items():
                    assert exact, f"{version}: HF -> TP2 -> HF is not bitwise"
                    assert scale > 1.0 and err <= 1e-4, (version, err, scale)
