"""Under TP=2, token ids past the vocabulary are refused on every rank before any step (they
used to train to a loss of 1e36 and exit 0), and the vocabulary-parallel embedding refuses an id
outside every rank's slice instead of embedding it to zeros."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import run_distributed

CONFIGS = Path(__file__).resolve().parents[2] / "megalite" / "configs"


def _pretrain_error(argv: list[str]) -> str | None:
    from megalite.training.prepare import parse_train_args
    from megalite.errors import MegaliteError
    from megalite.training.trainer import pretrain

    try:
        pretrain(parse_train_args(argv))
    except MegaliteError as e:
        return str(e)
    return None


def _embedding_errors(ids: list[int]) -> list[str | None]:
    import torch

    from megalite.distributed.parallel_state import ParallelState
    from megalite.errors import MegaliteError
    from megalite.parallel.context import ModelContext
    from megalite.parallel.layers import VocabParallelEmbedding

    emb = VocabParallelEmbedding(1024, 8,
                                 ModelContext(ParallelState.build(tensor_model_parallel_size=2)))
    out = []
    for i in ids:
        try:
            emb(torch.tensor([[3, i]]))
            out.append(None)
        except MegaliteError as e:
            out.append(str(e))
    return out


def test_tp2_refuses_on_every_rank_before_training(wide_dataset, sp_model, tmp_path):
    argv = ["--config", str(CONFIGS / "tiny-gpt.yaml"), "--data-path", wide_dataset,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--tensor-model-parallel-size", "2", "--micro-batch-size", "2", "--seq-length", "32",
            "--train-iters", "2", "--lr-warmup-iters", "1", "--eval-iters", "0",
            "--save", str(tmp_path / "ckpt")]
    errors = run_distributed(_pretrain_error, 2, argv, timeout=300)
    for e in errors:
        assert e is not None and e.startswith(f"{wide_dataset}.bin: token id ")
        assert "outside the model's vocabulary of 1000 ids" in e
    assert not (tmp_path / "ckpt").exists() or not os.listdir(tmp_path / "ckpt")


def test_tp2_embedding_refuses_ids_outside_every_slice():
    # 1024 rows: rank 0 holds [0, 512), rank 1 [512, 1024); 1024 and -1 belong to neither
    for rank_errors in run_distributed(_embedding_errors, 2, [511, 512, 1023, 1024, -1]):
        assert rank_errors[:3] == [None, None, None]
        assert "token id 1024 is outside the embedding's 1024 rows" in rank_errors[3]
        assert "token id -1 is outside the embedding's 1024 rows" in rank_errors[4]
