"""``megalite convert`` for T5 (v1.0 and v1.1), end to end through the command line.

An HF T5 directory as the Hub has them (safetensors, T5Tokenizer's files and ``spiece.model``,
hf_common.write_hf_t5_dir) goes ``from-hf --verify`` into a TP=2 checkpoint and ``to-hf
--verify`` back: the weights come back bit for bit, ``AutoModelForSeq2SeqLM`` and
``AutoTokenizer`` load the export, the tokenizer travels (``spiece.model`` becomes the
checkpoint's SentencePiece tokenizer, then ``tokenizer.model`` + ``tokenizer.json`` of the
export, giving the same ids), and the configs carry T5's special ids. --verify compares logits
within 1e-4 (the bound and the weight scale: tests/integration/test_hf_t5.py). Pipeline
parallelism is refused for T5 by name.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from hf_common import write_hf_t5_dir
from safetensors.torch import load_file

from megalite.cli import main as megalite_main


def convert(*argv) -> int:
    return megalite_main(["convert", *map(str, argv)])


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_from_hf_tp2_and_back_is_bitwise_and_loads_in_transformers(
        version, t5_spiece_model, corpus_texts, tmp_path, capsys):
    hf_dir = write_hf_t5_dir(tmp_path / "hf", version, t5_spiece_model)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert convert("from-hf", "--load", hf_dir, "--save", ckpt, "--verify",
                   "--target-tensor-parallel-size", 2) == 0
    err = capsys.readouterr().err
    assert "verify: max |megalite - HF|" in err
    assert "SentencePieceTokenizer spiece.model" in err
    saved = json.loads((ckpt / "iter_0000000" / "config.json").read_text())
    assert saved["model"]["model_type"] == "t5"
    assert saved["model"]["untie_embeddings_and_output_weights"] == (version == "v1.1")
    assert saved["model"]["decoder_start_token_id"] == 0
    assert saved["data"]["tokenizer_type"] == "SentencePieceTokenizer"
    assert os.path.isfile(saved["data"]["tokenizer_model"])

    assert convert("to-hf", "--load", ckpt, "--save", back, "--verify") == 0
    assert "verify: max |megalite - HF|" in capsys.readouterr().err
    original, exported = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "hf", back))
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name

    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(back).eval()
    assert isinstance(model, transformers.T5ForConditionalGeneration)
    assert (model.lm_head.weight is model.shared.weight) == (version == "v1.0")
    cfg = model.config
    assert (cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 0)
    assert cfg.scale_decoder_outputs == (version == "v1.0")
    assert model.generation_config.decoder_start_token_id == 0
    theirs = transformers.AutoTokenizer.from_pretrained(back)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=t5_spiece_model)
    same = 0
    for text in corpus_texts[:50]:
        a, b = theirs(text, add_special_tokens=False).input_ids, sp.encode(text)
        same += a == b
        if a != b:   # a unigram tie (README): the same text, pieces of equal total score
            assert sp.decode(a) == sp.decode(b)
            assert sum(map(sp.get_score, a)) == pytest.approx(sum(map(sp.get_score, b)),
                                                              abs=1e-4)
    assert same >= 45


def test_t5_refuses_pipeline_parallelism_and_has_no_classic_export(
        t5_spiece_model, tmp_path, capsys):
    hf_dir = write_hf_t5_dir(tmp_path / "hf", "v1.1", t5_spiece_model)
    assert convert("from-hf", "--load", hf_dir, "--save", tmp_path / "pp2",
                   "--target-pipeline-model-parallel-size", 2) == 2
    err = capsys.readouterr().err
    assert "is not implemented with pipeline parallelism" in err and "Traceback" not in err
    assert not (tmp_path / "pp2").exists()
    # the original Transformer's recipe has no Hugging Face class
    from megalite.checkpoint import save_checkpoint
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model import get_preset
    from megalite.model.encoder_decoder import EncoderDecoderModel
    from megalite.parallel.context import ModelContext
    cfg = get_preset("transformer-base").replace(num_layers=1, hidden_size=32,
                                                 num_attention_heads=2, ffn_hidden_size=64,
                                                 vocab_size=100)
    model = EncoderDecoderModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(0)
    save_checkpoint(str(tmp_path / "classic"), 1, model_chunks=[model], optimizer=None,
                    config={}, ps=ParallelState.single())
    assert convert("to-hf", "--load", tmp_path / "classic", "--save", tmp_path / "o") == 2
    assert "the original Transformer's sinusoidal recipe has none" in capsys.readouterr().err
