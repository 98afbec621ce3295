"""Hugging Face MoE models both ways: Mixtral, Qwen2-MoE (shared expert with its gate,
dense layers by ``mlp_only_layers``, ``norm_topk_prob`` false and true) and Qwen3-MoE (query/key
norms per head, head_dim != hidden / heads, no shared expert, both ``norm_topk_prob``), and
dense Qwen3 through the same query/key norms.

``megalite convert from-hf --verify`` of a random HF model, then: megalite's logits equal HF's
(1e-4 absolute on O(1) logits: float32 rounding of the same operations in another order, as in
test_hf_parity.py), ``to-hf`` gives back every tensor bit for bit, and greedy generation
gives the tokens ``transformers``' ``generate`` gives (no step a near-tie).
"""
from __future__ import annotations

import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from hf_common import MOE_KINDS as KINDS, hf_moe_model
from megalite.cli import main as megalite_main
from megalite.inference.generation import generate_tokens
from megalite.inference.sampling import SamplingConfig

TOL = 1e-4
VOCAB = 300
EXPERTS = {"mixtral": 4, "qwen3": None}    # the Qwen MoE models: 6


def load_megalite(ckpt):
    from megalite.checkpoint import load_model_weights, read_model_config
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    cfg = read_model_config(ckpt)
    model = GPTModel(cfg, ModelContext(ParallelState.single())).eval()
    load_model_weights(ckpt, [model], ParallelState.single())
    return model, cfg


def hf_tensors(directory) -> dict:
    """Every tensor of the safetensors files in an HF directory, by name."""
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def convert(*argv) -> int:
    return megalite_main(["convert", *map(str, argv)])


@pytest.mark.parametrize("kind", KINDS)
def test_from_hf_logits_round_trip_and_greedy_generation(kind, tmp_path, capsys):
    hf_dir, ckpt, back = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "back"
    hf = hf_moe_model(kind, hf_dir, VOCAB)
    assert convert("from-hf", "--load", hf_dir, "--save", ckpt, "--verify") == 0
    assert "verify: max |megalite - HF|" in capsys.readouterr().err
    model, cfg = load_megalite(ckpt)
    assert cfg.num_experts == EXPERTS.get(kind, 6)
    assert cfg.qk_layernorm == kind.startswith("qwen3")
    if kind.startswith("qwen") and cfg.num_experts:
        assert cfg.moe_layer_freq == [1, 0, 1]
        assert cfg.moe_router_pre_softmax == (not kind.endswith("norm"))
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)[..., :VOCAB]
        theirs = hf(input_ids=tokens).logits
    assert theirs.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() <= TOL

    # to-hf: the same tensors, bit for bit, under the same names
    assert convert("to-hf", "--load", ckpt, "--save", back) == 0
    original, returned = load_file(os.path.join(hf_dir, "model.safetensors")), hf_tensors(back)
    assert set(returned) == set(original)
    for name, t in original.items():
        assert torch.equal(returned[name], t), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    assert type(reloaded).__name__ == type(hf).__name__

    # greedy generation equals transformers'
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = tokens[:1, :7]
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=8)
    mine = generate_tokens(model, prompt, 8, SamplingConfig(), vocab_size=VOCAB)
    assert out[0, 7:].tolist() == mine.tokens[0].tolist()


def test_from_hf_into_expert_parallel_layout_and_back(tmp_path, capsys):
    """from-hf --target-expert-model-parallel-size 2 writes the EP=2 files (each expert rank's
    experts apart), --verify reads them back to HF's logits, and to-hf returns every tensor bit
    for bit; an EP that does not divide the experts is refused naming the flag."""
    hf_dir, ckpt, back = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "back"
    hf_moe_model("mixtral", hf_dir, VOCAB)
    assert convert("from-hf", "--load", hf_dir, "--save", ckpt, "--verify",
                   "--target-expert-model-parallel-size", "2") == 0
    out = capsys.readouterr()
    assert "EP=2" in out.out + out.err and "verify: max |megalite - HF|" in out.err
    files = [f for _, _, fs in os.walk(ckpt) for f in fs]
    assert any("_ep01" in f for f in files), files
    assert convert("to-hf", "--load", ckpt, "--save", back) == 0
    original, returned = load_file(os.path.join(hf_dir, "model.safetensors")), hf_tensors(back)
    assert set(returned) == set(original)
    assert all(torch.equal(returned[n], t) for n, t in original.items())
    assert convert("from-hf", "--load", hf_dir, "--save", tmp_path / "bad",
                   "--target-expert-model-parallel-size", "3") == 2
    assert "--target-expert-model-parallel-size 3 must be 1 or divide" in capsys.readouterr().err


def test_refusals_name_the_reason():
    from megalite.convert import config_to_hf
    from megalite.convert.hf_moe import config_from_hf
    from megalite.errors import MegaliteError
    from megalite.model import get_preset
    with pytest.raises(MegaliteError, match="sliding_window"):
        config_from_hf(transformers.MixtralConfig(sliding_window=16, max_position_embeddings=64))
    moe = get_preset("tiny-moe")     # shared expert without a QKV bias: neither family
    with pytest.raises(MegaliteError, match="Mixtral conversion needs"):
        config_to_hf(moe)
    with pytest.raises(MegaliteError, match="dropless"):
        config_to_hf(moe.replace(add_qkv_bias=True, moe_expert_capacity_factor=1.0))


def test_mixtral_8x7b_preset_has_hf_total_and_active_parameter_counts():
    from megalite.convert import config_to_hf
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model import get_preset
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    cfg = get_preset("mixtral-8x7b")
    ours = GPTModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    with torch.device("meta"):
        hf = transformers.MixtralForCausalLM(config_to_hf(cfg))
    total = sum(p.numel() for p in ours.parameters())
    assert total == sum(p.numel() for p in hf.parameters()) == 46_702_792_704
    # active per token: all but (E - k) = 6 experts of each layer (an expert: 3 x 4096 x 14336)
    expert = sum(p.numel() for n, p in ours.named_parameters() if ".experts.0." in n)
    assert expert == 32 * 3 * 4096 * 14336
    assert total - (8 - 2) * expert == 12_879_925_248


@pytest.mark.parametrize("name,total,active", [("qwen3-moe-tiny", 425_600, 278_144),
                                               ("qwen3-30b-a3b", 30_532_122_624,
                                                3_353_032_704)])
def test_qwen3_moe_presets_have_hf_parameter_counts(name, total, active):
    """The presets convert to Qwen3MoeForCausalLM configs whose models, built on the meta
    device, hold as many parameters as megalite's (less its vocabulary padding rows: 24 x 64
    in the embedding and the output layer of the tiny one's vocabulary 1000; none for
    151936 = 1187 x 128); active = all but the E - k unchosen experts of each MoE layer."""
    from megalite.convert import config_to_hf
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model import get_preset
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    cfg = get_preset(name)
    hf_cfg = config_to_hf(cfg)
    assert hf_cfg.architectures == ["Qwen3MoeForCausalLM"]
    ours = GPTModel(cfg, ModelContext(ParallelState.single(), device="meta"))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    padding = 2 * (cfg.padded_vocab(1) - cfg.vocab_size) * cfg.hidden_size
    ours_total = sum(p.numel() for p in ours.parameters()) - padding
    assert ours_total == sum(p.numel() for p in hf.parameters()) == total
    expert = sum(p.numel() for n, p in ours.named_parameters() if ".experts.0." in n)
    assert total - (cfg.num_experts - cfg.moe_router_topk) * expert == active
