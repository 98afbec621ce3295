"""A T5 run saved at TP=2 x DP=2 (4 gloo processes, span-corrupted sentence-split WordPiece
tokens of the built-in corpus; 2 encoder + 3 decoder layers, dropout on) and resumed from its
iteration-3 checkpoint:

* under its own layout: the losses of iterations 4-6 are those of the uninterrupted run, float
  for float (model, optimizer, every RNG stream and the data position restored);
* under TP=4, DP=4, ZeRO-2 (TP=2 x DP=2) and ZeRO-3 (DP=4), dropout off: within 1e-4 relative of
  the same continuation at TP=2 x DP=2 (summation order only; a lost optimizer state moves the
  loss by far more);
* after ``megalite convert reshard`` to TP=4: bitwise the online TP=4 resume (the same tensors).

The same checks as GPT's (test_checkpoint_resume.py) and BERT's (test_bert_checkpoint.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import DistributedWorkers
from layout_common import train_and_rewind

CONFIG = str(Path(__file__).resolve().parents[2] / "megalite" / "configs" / "tiny-t5.yaml")
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]


@pytest.fixture(scope="module")
def group():
    with DistributedWorkers(4, timeout=600) as w:
        yield w


def argv(prefix: str, vocab: str, tp: int, *extra: str) -> list[str]:
    return ["--config", CONFIG, "--data-path", prefix, "--split", "98,2,0",
            "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", vocab,
            "--vocab-extra-ids", "100", "--hidden-size", "32", "--num-layers", "2",
            "--decoder-num-layers", "3", "--seq-length", "48", "--decoder-seq-length", "32",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
            "--lr-warmup-iters", "1", "--log-interval", "100", "--eval-iters", "0",
            "--seed", "3", "--clip-grad", "0.5", "--train-iters", "6",
            "--tensor-model-parallel-size", str(tp), *extra]


@pytest.fixture(scope="module")
def saved(group, wordpiece_sentence_dataset, wordpiece_vocab, tmp_path_factory):
    """(data, the run's directory with ``latest`` at iteration 3, its 6 losses)."""
    data = (wordpiece_sentence_dataset, wordpiece_vocab)
    directory = str(tmp_path_factory.mktemp("t5_ckpt") / "run")
    full = group.run(train_and_rewind, argv(*data, 2, *DROPOUT, "--save", directory,
                                            "--save-interval", "3"), 2, 1, directory, 3)[0]
    assert len(full) == 6
    return data, directory, full


def resumed(group, data, directory, tp, *extra):
    return group.run(train_and_rewind, argv(*data, tp, "--load", directory, *extra), tp, 1)


def test_resume_is_bitwise(group, saved):
    data, directory, full = saved
    for losses in resumed(group, data, directory, 2, *DROPOUT):
        assert losses == full[3:], (full, losses)


@pytest.mark.parametrize("tp,extra", [(4, ()), (1, ()), (2, ("--zero-stage", "2")),
                                      (1, ("--zero-stage", "3"))],
                         ids=["tp4", "dp4", "zero2-tp2-dp2", "zero3-dp4"])
def test_resume_under_another_layout(group, saved, tp, extra):
    data, directory, _ = saved
    same = resumed(group, data, directory, 2, *NO_DROPOUT)[0]
    for other in resumed(group, data, directory, tp, *NO_DROPOUT, *extra):
        assert len(other) == 3
        for a, b in zip(same, other, strict=True):
            assert abs(a - b) <= 1e-4 * abs(a), (same, other)


def test_offline_reshard_resumes_like_online(group, saved, tmp_path):
    from megalite.convert.cli import main as convert
    data, directory, _ = saved
    online = resumed(group, data, directory, 4, *DROPOUT)[0]
    target = str(tmp_path / "tp4")
    assert convert(["reshard", "--load", directory, "--save", target,
                    "--target-tensor-parallel-size", "4"]) == 0
    assert os.path.isfile(os.path.join(target, "latest"))
    for losses in resumed(group, data, target, 4, *DROPOUT):
        assert losses == online
