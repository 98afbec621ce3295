"""``megalite convert`` for BERT, end to end: a Hugging Face ``BertForPreTraining`` (post-norm)
or ``MegatronBertForPreTraining`` (pre-norm) directory with its WordPiece ``vocab.txt`` ->
``from-hf`` into TP=2 x PP=2 (``--verify``) -> ``to-hf`` (``--verify``) gives back every tensor
bit for bit, and a directory ``AutoTokenizer`` / ``AutoModelForPreTraining`` load; ``megalite
train --load`` of the converted checkpoint needs no tokenizer flags, and its first loss is the
HF model's pretraining loss on the same batch (the vocabulary grown to the BERT data's, see
that test).

Tolerances: ``--verify`` fails above 1e-4 absolute on the logits (float32; the same math in other
kernels agrees to ~1e-6; a mapping error moves logits by ~1e-1, and the redrawn weights make
them O(1)); the first training loss equals HF's within 1e-5 relative (float32 summation order
only: the same weights, batch and formula -- the masked-token mean of the masked-LM
cross-entropy plus the next-sentence cross-entropy, which is Megatron-LM's BERT loss).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (AutoModelForPreTraining, AutoTokenizer, BertConfig, BertForPreTraining,
                          MegatronBertConfig, MegatronBertForPreTraining)

from hf_common import scale_up_
from megalite.cli import main as megalite_main

HF = {"post": (BertForPreTraining, BertConfig), "pre": (MegatronBertForPreTraining,
                                                        MegatronBertConfig)}


def _hf_dir(path, placement, vocab_file, vocab_size):
    """A random HF BERT (O(1) logits) with the WordPiece vocab beside it, as a Hugging Face
    directory holds it (vocab.txt + tokenizer_config.json)."""
    torch.manual_seed(11)
    model_class, config_class = HF[placement]
    model = scale_up_(model_class(config_class(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)))
    model.save_pretrained(path)
    shutil.copyfile(vocab_file, os.path.join(path, "vocab.txt"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True}, f)
    return model.eval()


def _convert(*argv) -> int:
    return megalite_main(["convert", *map(str, argv)])


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_from_hf_into_tp2pp2_and_back_is_bitwise(placement, wordpiece_vocab, corpus_texts,
                                                 tmp_path, capsys):
    # vocab 2002: the BERT data's ids (vocab.txt's 2000 + [BOS], [EOS]), as a Megatron BERT's
    _hf_dir(tmp_path / "hf", placement, wordpiece_vocab, 2002)
    assert _convert("from-hf", "--load", tmp_path / "hf", "--save", tmp_path / "ckpt",
                    "--target-tensor-parallel-size", 2,
                    "--target-pipeline-model-parallel-size", 2, "--verify") == 0
    out = capsys.readouterr().err               # the command's summary line
    assert "tokenizer BertWordPieceLowerCase vocab.txt" in out and "verified" in out
    with open(tmp_path / "ckpt" / "iter_0000000" / "config.json") as f:
        data = json.load(f)["data"]
    assert data["tokenizer_type"] == "BertWordPieceLowerCase"
    assert data["vocab_file"] == str(tmp_path / "ckpt" / "tokenizer" / "vocab.txt")
    assert sorted(os.listdir(tmp_path / "ckpt" / "iter_0000000")) == [
        "config.json", "manifest.json", "meta.json"] + [
        f"model_tp0{t}_pp0{p}.safetensors" for t in range(2) for p in range(2)]

    assert _convert("to-hf", "--load", tmp_path / "ckpt", "--save", tmp_path / "back",
                    "--verify") == 0
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(original)
    for name, t in original.items():
        assert torch.equal(back[name], t), name
    with open(tmp_path / "back" / "config.json") as f:
        hf_config = json.load(f)
    assert hf_config["architectures"] == [HF[placement][0].__name__]
    assert hf_config["pad_token_id"] == 0                      # [PAD] of the vocab
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path / "back")) is HF[placement][0]
    from megalite.data.tokenizers import build_tokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path / "back")
    ours = build_tokenizer("BertWordPieceLowerCase", vocab_file=wordpiece_vocab)
    for text in corpus_texts[:20]:
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
    # an encoder does not continue text: generate refuses it in one line
    capsys.readouterr()
    assert megalite_main(["generate", "--load", str(tmp_path / "ckpt"), "--prompt", "x"]) == 2
    assert "holds a BERT model" in capsys.readouterr().err


def test_train_from_converted_checkpoint_needs_no_tokenizer_flags(
        wordpiece_vocab, wordpiece_sentence_dataset, tmp_path, capsys):
    """An HF BERT whose vocab.txt lacks [BOS] and [EOS] (vocab_size 2000 = vocab.txt): the
    checkpoint's vocabulary grows to the BERT data's 2002 ids (zero rows, --verify on the HF
    ids), training starts from it with the tokenizer it recorded, and its first loss is HF's
    model's (with the two new logits, 0)."""
    hf = _hf_dir(tmp_path / "hf", "post", wordpiece_vocab, 2000)
    assert _convert("from-hf", "--load", tmp_path / "hf", "--save", tmp_path / "ckpt",
                    "--verify") == 0
    assert "vocabulary 2000 -> 2002 for its data" in capsys.readouterr().err

    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import Trainer
    config = parse_train_args([
        "--load", str(tmp_path / "ckpt"), "--data-path", wordpiece_sentence_dataset,
        "--split", "98,2,0", "--seq-length", "64", "--micro-batch-size", "4",
        "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-4", "--eval-iters", "0",
        "--log-interval", "100"])
    assert config.model.model_type == "bert" and config.model.vocab_size == 2002
    assert config.data.tokenizer_type == "BertWordPieceLowerCase"
    trainer = Trainer(config)
    trainer._load_weights_only(trainer.start)
    batch = trainer.train_data.next_global_batch()[0]
    trainer.train_data.consumed_samples = 0
    loss = trainer.train().losses[0]
    assert batch["text"].max() < 2000            # no random [BOS]/[EOS] for HF to embed
    with torch.no_grad():
        out = hf(input_ids=batch["text"], token_type_ids=batch["types"],
                 attention_mask=batch["padding_mask"])
    # HF's pretraining loss, over the 2002 ids: the two new rows' logits are 0
    logits = torch.cat([out.prediction_logits, torch.zeros(4, 64, 2)], dim=-1)
    masked = batch["loss_mask"] == 1
    ref = F.cross_entropy(logits[masked], batch["labels"][masked]) + F.cross_entropy(
        out.seq_relationship_logits, batch["is_random"])
    assert abs(loss - ref.item()) <= 1e-5 * ref.item(), (loss, ref.item())
