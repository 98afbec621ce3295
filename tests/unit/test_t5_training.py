"""T5 through ``megalite train`` (one process; the layouts are tests/distributed/
test_t5_layouts.py): Megatron-LM's T5 flags, the start-up refusals, the dry run, and the
first loss of a real run recomputed independently.

The recomputed loss: a fresh model with the run's seed (layout-independent init) on the same
mock samples, cross-entropy by ``torch.nn.functional.cross_entropy`` over the gathered logits,
averaged over each microbatch's decoder tokens and then over the microbatches, must equal the
trainer's first logged loss within 1e-6 relative (fp32: the vocabulary-parallel cross-entropy
and F.cross_entropy sum in another order).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from megalite.cli import main
from megalite.errors import ConfigError
from megalite.training.dry_run import plan_run
from megalite.training.prepare import parse_train_args

T5 = os.path.join(os.path.dirname(__file__), "..", "..", "megalite", "configs", "tiny-t5.yaml")
MOCK = ["--config", T5, "--mock-data", "--vocab-size", "1000"]


def test_megatron_t5_flags_set_the_model_and_data():
    cfg = parse_train_args(MOCK + [
        "--encoder-num-layers", "3", "--decoder-num-layers", "2", "--encoder-seq-length", "48",
        "--decoder-seq-length", "16", "--relative-attention-num-buckets", "16",
        "--relative-attention-max-distance", "64", "--vocab-extra-ids", "7",
        "--mask-prob", "0.2", "--short-seq-prob", "0.05"])
    m = cfg.model
    assert (m.model_type, m.num_layers, m.decoder_layers, m.seq_length, m.decoder_seq_length,
            m.relative_attention_num_buckets, m.relative_attention_max_distance) == \
        ("t5", 3, 2, 48, 16, 16, 64)
    assert (cfg.data.vocab_extra_ids, cfg.data.mask_prob, cfg.data.short_seq_prob) == \
        (7, 0.2, 0.05)


def test_start_up_refusals(capsys):
    assert main(["train", *MOCK, "--pipeline-model-parallel-size", "2", "--dry-run",
                 "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--pipeline-model-parallel-size 2 with --model-type t5" in err
    assert "Traceback" not in err and err.strip().startswith("error:")
    with pytest.raises(ConfigError, match="--model-type t5 needs --decoder-seq-length"):
        parse_train_args(["--config", "tiny-gpt", "--mock-data", "--model-type", "t5",
                          "--norm-placement", "pre"])
    with pytest.raises(ConfigError, match="decoder_seq_length is for model_type 't5'"):
        parse_train_args(["--config", "tiny-gpt", "--mock-data", "--decoder-seq-length", "8"])


def test_dry_run_plans_t5(wordpiece_sentence_dataset, wordpiece_vocab, sp_model, capsys):
    layout = ["--config", T5, "--data-path", wordpiece_sentence_dataset,
              "--tensor-model-parallel-size", "2"]
    plan_args = layout + ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                          wordpiece_vocab]
    assert main(["train", *plan_args, "--dry-run", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    # the model vocabulary is the T5 data's: vocab.txt (2000) + [BOS] + [EOS] + 100 sentinels
    assert "model: T5 pre-norm, 4 encoder + 4 decoder layers" in out
    assert "vocab 2102 (padded 2304)" in out and "seq 128 (encoder) / 32 (decoder)" in out
    plan = plan_run(parse_train_args(plan_args), 4, device="cpu")
    s, d, b, h, a, t = 128, 32, 4, 64, 4, 2          # tiny-t5.yaml, TP 2, fp32 (x2)
    # on CPU the learned position bias (a mask requiring grad) takes SDPA's math backend,
    # which keeps the self-attention scores; the cross-attention's kernel is fused
    layer = lambda n: n * b * h * (10 + 24 / t + 5 * a * n / (h * t)) * 2  # noqa: E731
    cross = (d * b * h * 5 + 4 * d * b * h / t + 4 * s * b * h / t) * 2
    assert plan.stages[0].memory_bytes["activations"] == pytest.approx(
        4 * layer(s) + 4 * (layer(d) + cross), rel=1e-12)
    assert plan.stages[0].memory_bytes["logits"] == d * b * 2304 / t * 4 * 2
    # T5 data needs a WordPiece vocabulary: refused before anything runs
    assert main(["train", *layout, "--dry-run", "--world-size", "4", "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", sp_model]) == 2
    assert "--model-type t5: BERT and T5 data need a WordPiece vocabulary" in \
        capsys.readouterr().err


def test_first_loss_equals_an_independent_computation():
    from megalite.data.t5_dataset import MockT5Dataset
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model.encoder_decoder import EncoderDecoderModel
    from megalite.parallel.context import ModelContext
    from megalite.training.trainer import pretrain
    cfg = parse_train_args(MOCK + ["--train-iters", "1", "--lr-warmup-iters", "0",
                                   "--micro-batch-size", "2",
                                   "--global-batch-size", "6", "--eval-iters", "0",
                                   "--seed", "21"])
    (logged,) = pretrain(cfg).losses
    model = EncoderDecoderModel(cfg.model, ModelContext(ParallelState.single()))
    model.init_weights(21)
    data = MockT5Dataset(1000, 128, 32, 6, 21, cfg.data.mask_prob)
    means = []
    with torch.no_grad():
        for first in (0, 2, 4):
            items = [data[i] for i in (first, first + 1)]
            mb = {k: torch.stack([torch.from_numpy(x[k]) for x in items]) for k in items[0]}
            logits = model(mb["text_enc"], mb["text_dec"], enc_mask=mb["enc_mask"],
                           dec_mask=mb["dec_mask"])[..., :1000]
            ce = F.cross_entropy(logits.transpose(1, 2), mb["labels"].clamp(min=0),
                                 reduction="none")
            means.append((ce * mb["loss_mask"]).sum() / mb["loss_mask"].sum())
    expected = torch.stack(means).double().mean().item()
    assert abs(logged - expected) <= 1e-6 * expected, (logged, expected)
