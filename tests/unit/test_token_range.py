"""Token ids past the model's vocabulary are refused before training, naming the file
(issue: data tokenized with a 2,000-entry tokenizer trained with a 1,000-entry one used to train
garbage under TP=2 and end in an IndexError at TP=1), in ``--dry-run`` too; the embedding itself
never maps an out-of-range id to zeros."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megalite.cli import main
from megalite.training.prepare import parse_train_args
from megalite.data.indexed import IndexedDatasetBuilder
from megalite.data.token_range import check_token_ids, token_id_range
from megalite.errors import MegaliteError

CONFIGS = Path(__file__).resolve().parents[2] / "megalite" / "configs"


def _train_argv(prefix, sp_model, save):
    return ["--config", str(CONFIGS / "tiny-gpt.yaml"), "--data-path", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--micro-batch-size", "2", "--seq-length", "32", "--train-iters", "2",
            "--eval-iters", "0", "--lr-warmup-iters", "1", "--save", str(save)]


def _write(prefix, tokens, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix, dtype) as b:
        b.add_document(np.asarray(tokens))
        b.finalize()
    return prefix


def test_range_is_the_files_and_is_cached(tmp_path, wide_dataset):
    from megalite.data.indexed import IndexedDataset

    ds = IndexedDataset(wide_dataset)
    tokens = np.concatenate([ds[i] for i in range(len(ds))])
    assert token_id_range(wide_dataset) == (int(tokens.min()), int(tokens.max()))
    assert int(tokens.max()) >= 1000  # the point of this fixture: ids a 1,000 vocab lacks
    entries = glob.glob(os.path.join(os.path.dirname(wide_dataset), "index-cache", "*.json"))
    kinds = [json.load(open(e))["description"]["kind"] for e in entries]
    assert kinds.count("token-id-range") == 1

    # a rewritten file (new size/mtime) is scanned again, not served from the stale entry
    p = _write(str(tmp_path / "small"), [5, 7, 3], np.int32)
    assert token_id_range(p) == (3, 7)
    _write(p, [5, 7, 3, -4, 900], np.int32)
    assert token_id_range(p) == (-4, 900)
    with pytest.raises(MegaliteError, match=r"small\.bin: token id -4 is outside the model's "
                                            r"vocabulary of 1000 ids \(the file holds ids -4\.\.900\)"):
        check_token_ids([p], 1000)
    check_token_ids([_write(str(tmp_path / "ok"), [0, 999])], 1000)  # the edges are fine


def test_dry_run_refuses(wide_dataset, sp_model, tmp_path, capsys):
    rc = main(["train", *_train_argv(wide_dataset, sp_model, tmp_path / "ckpt"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{wide_dataset}.bin: token id" in err and "vocabulary of 1000 ids" in err
    assert "ok: nothing was trained" not in capsys.readouterr().out


def test_training_refuses_before_any_step_tp1(wide_dataset, sp_model, tmp_path):
    from megalite.training.trainer import pretrain

    config = parse_train_args(_train_argv(wide_dataset, sp_model, tmp_path / "ckpt"))
    with pytest.raises(MegaliteError, match=rf"{wide_dataset}\.bin: token id \d+ is outside the "
                                            r"model's vocabulary of 1000 ids"):
        pretrain(config)
    assert not (tmp_path / "ckpt").exists() or not os.listdir(tmp_path / "ckpt")


def test_the_same_data_with_its_own_tokenizer_trains(wide_dataset, hf_tokenizer_json, tmp_path):
    """The check refuses only the mismatch: with the 2,000-entry tokenizer it was made with,
    the same file trains (so the refusals above are about the ids, not the file)."""
    from megalite.training.trainer import pretrain

    argv = _train_argv(wide_dataset, hf_tokenizer_json, tmp_path / "ckpt")
    argv[argv.index("SentencePieceTokenizer")] = "HuggingFaceTokenizer"
    result = pretrain(parse_train_args(argv))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))


@pytest.mark.parametrize("bad", [1000, 1023, -1])
def test_embedding_refuses_out_of_range_ids(bad):
    from megalite.distributed.parallel_state import ParallelState
    from megalite.parallel.context import ModelContext
    from megalite.parallel.layers import VocabParallelEmbedding

    emb = VocabParallelEmbedding(1000, 8, ModelContext(ParallelState.single()))
    emb(torch.tensor([[0, 999]]))
    with pytest.raises(MegaliteError, match=rf"token id {bad} is outside the embedding's 1000 rows"):
        emb(torch.tensor([[1, bad, 2]]))
