"""T5 checkpoints through the real trainer (one 4-process gloo group, the built-in corpus as
sentence-split WordPiece tokens with T5's span corruption): bitwise resume under the same
layout, resume under other layouts (online resharding by parameter name, ZeRO included) and
offline resharding (``megalite convert reshard``).

Tolerances (those of test_checkpoint_resume.py, GPT's, and test_bert_checkpoint.py): a
same-layout resume is bitwise (float equality of every logged loss: model, optimizer, every
RNG stream, dropout included, and the data position). Under another layout the continued curve
must agree within 1e-4 relative: the fp32 layouts differ only in summation order; the bound
catches a resume that loses the optimizer state. Offline resharding writes the same tensors as
online resharding, so its resumed curve is bitwise the online one.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import DistributedWorkers
from layout_common import rewind_latest

from megalite.distributed.parallel_state import ParallelState

CONFIG = str(Path(__file__).resolve().parents[2] / "megalite" / "configs" / "tiny-t5.yaml")


@pytest.fixture(scope="module")
def workers():
    with DistributedWorkers(4, timeout=600) as w:
        yield w


@pytest.fixture(scope="module")
def data(wordpiece_sentence_dataset, wordpiece_vocab):
    return wordpiece_sentence_dataset, wordpiece_vocab


def _args(data, extra):
    from megalite.training.prepare import parse_train_args
    prefix, vocab = data
    return parse_train_args([
        "--config", CONFIG, "--data-path", prefix, "--split", "98,2,0",
        "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", vocab,
        "--vocab-extra-ids", "100", "--hidden-size", "32", "--num-layers", "2",
        "--decoder-num-layers", "3", "--seq-length", "48", "--decoder-seq-length", "32",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
        "--lr-warmup-iters", "1", "--log-interval", "100", "--eval-iters", "0", "--seed", "3",
        "--clip-grad", "0.5", "--train-iters", "6", *extra])


def _tp(tp):
    return ["--tensor-model-parallel-size", str(tp)]


def w_reference(root, data):
    """TP=2 x DP=2 with dropout: 6 iterations saving every 3; ``latest`` then points at 3, as
    if the run had been killed right after that save."""
    from megalite.training.trainer import pretrain
    ps = ParallelState.build(2, 1)
    directory = os.path.join(root, "ref")
    full = pretrain(_args(data, _tp(2) + [
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
        "--save", directory, "--save-interval", "3"]), ps)
    rewind_latest(ps, directory, 3)
    return full.losses


def w_resume(directory, data, tp, extra=()):
    from megalite.training.trainer import pretrain
    return pretrain(_args(data, _tp(tp) + [
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--load", directory,
        *extra]), ParallelState.build(tp, 1)).losses


@pytest.fixture(scope="module")
def reference(workers, data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("t5_ckpt"))
    (full, *_) = workers.run(w_reference, root, data, timeout=600)
    assert len(full) == 6
    return os.path.join(root, "ref"), full


def test_resume_is_bitwise(workers, data, reference):
    directory, full = reference
    for resumed in workers.run(w_resume, directory, data, 2, timeout=600):
        assert resumed == full[3:], (full, resumed)      # float equality: bitwise


@pytest.mark.parametrize("tp,extra", [
    (4, ()), (1, ()), (2, ("--zero-stage", "2")), (1, ("--zero-stage", "3"))],
    ids=["tp4", "dp4", "zero2-tp2-dp2", "zero3-dp4"])
def test_resume_under_another_layout(workers, data, reference, tp, extra):
    # Dropout masks depend on the layout (per-rank streams), so compare without dropout: the
    # continuation of the same checkpoint, with dropout off, under TP=2 x DP=2 and the other.
    directory, _ = reference
    off = ("--hidden-dropout", "0", "--attention-dropout", "0")
    same = workers.run(w_resume, directory, data, 2, off, timeout=600)[0]
    for other in workers.run(w_resume, directory, data, tp, off + tuple(extra), timeout=600):
        assert len(other) == 3
        for a, b in zip(same, other, strict=True):
            assert abs(a - b) <= 1e-4 * abs(a), (same, other)


def test_offline_reshard_resumes_like_online(workers, data, reference, tmp_path):
    from megalite.convert.cli import main as convert
    directory, _ = reference
    online = workers.run(w_resume, directory, data, 4, timeout=600)[0]
    assert convert(["reshard", "--load", directory, "--save", str(tmp_path / "b"),
                    "--target-tensor-parallel-size", "4"]) == 0
    for losses in workers.run(w_resume, str(tmp_path / "b"), data, 4, timeout=600):
        assert losses == online                     # bitwise: the same resharded tensors
