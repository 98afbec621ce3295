"""The training loop in one process: the start-up banner, what `--load` says it did, one line
per saved checkpoint, and `--keep-last` pruning."""
from __future__ import annotations

import os

import pytest

from megalite.training.prepare import parse_train_args
from megalite.errors import MegaliteError
from megalite.training.trainer import pretrain

TINY = ["--config", "tiny-gpt", "--mock-data", "--num-layers", "2", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--eval-iters", "0", "--log-interval", "100", "--lr-warmup-iters", "0"]


def test_load_of_an_empty_directory_says_it_starts_from_scratch(tmp_path, capsys):
    result = pretrain(parse_train_args(TINY + ["--train-iters", "1", "--load", str(tmp_path)]))
    assert result.iteration == 1
    assert f"no checkpoint in {tmp_path}: starting from scratch" in capsys.readouterr().out


def test_start_up_banner_and_one_line_per_saved_checkpoint(tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    pretrain(parse_train_args(TINY + ["--train-iters", "2", "--save", save,
                                      "--save-interval", "1"]))
    out = capsys.readouterr().out
    assert out.startswith("megalite train: 1 process(es) = TP 1 x PP 1 x DP 1\n")
    for line in ("model: 2 layers, hidden 64, 4 heads, vocab 1000 (padded 1024), seq 64; ",
                 "batch: global 2 = micro 2 x DP 1 x 1 microbatch(es) per iteration; 2 iter",
                 "data: mock data: random tokens below 1000",
                 "tokenizer: none (vocabulary size 1000 given)",
                 "start: from scratch (no --load); 2 iterations to go (to 2)"):
        assert "\n" + line in out, line
    saved = [line for line in out.splitlines() if line.startswith("saved checkpoint")]
    assert [line.split(" (")[0] for line in saved] == [
        f"saved checkpoint of iteration {i} to {save}/iter_000000{i}" for i in (1, 2)]
    pretrain(parse_train_args(TINY + ["--train-iters", "3", "--load", save]))
    assert f"\nstart: resumed from {save} at iteration 2; 1 iterations to go (to 3)\n" in \
        capsys.readouterr().out
    # --load alone: the model's shape comes from the checkpoint (here 2 layers, not tiny-gpt's 4)
    alone = parse_train_args(["--load", save, "--mock-data", "--train-iters", "3"])
    assert alone.model == parse_train_args(TINY).model
    assert "the vocabulary size is unknown" in str(pytest.raises(
        MegaliteError, parse_train_args, ["--load", str(tmp_path), "--mock-data"]).value)


@pytest.mark.parametrize("make", ["missing", "file"])
def test_load_of_a_missing_path_is_an_error_not_a_fresh_start(tmp_path, make):
    """A mistyped --load must not train from iteration 0 (in a requeue loop, silently)."""
    path = tmp_path / "typo"
    if make == "file":
        path.write_text("x")
    with pytest.raises(MegaliteError) as e:
        parse_train_args(TINY + ["--load", str(path)])
    what = "does not exist" if make == "missing" else "is not a directory"
    assert str(e.value) == (f"--load (training.load): {path} {what} (to start from scratch, "
                            "create it or leave out --load)")


def test_keep_last_prunes_older_checkpoints_and_resume_continues(tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    first = pretrain(parse_train_args(TINY + ["--train-iters", "3", "--save", save,
                                              "--save-interval", "1", "--keep-last", "2"]))
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == [
        "iter_0000002", "iter_0000003"]
    resumed = pretrain(parse_train_args(TINY + ["--train-iters", "4", "--load", save]))
    assert "resumed from" in capsys.readouterr().out and resumed.losses and len(resumed.losses) == 1
    assert resumed.iteration == 4 and first.iteration == 3


def _dropout_run(tmp_path, extra):
    """4 iterations with dropout, saved at 2; then a resume from iteration 2 with ``extra``."""
    save = str(tmp_path / "ckpt")
    args = TINY + ["--hidden-dropout", "0.2", "--attention-dropout", "0.2", "--train-iters", "4"]
    full = pretrain(parse_train_args(args + ["--save", save, "--save-interval", "2"]))
    with open(os.path.join(save, "latest"), "w") as f:
        f.write("iter_0000002\n")
    return full.losses, pretrain(parse_train_args(args + ["--load", save, *extra])).losses


def test_resume_restores_rng_unless_no_load_rng(tmp_path, capsys):
    """Dropout masks come from the saved RNG: bitwise with it, different with --no-load-rng
    (a fresh seeding); the optimizer state is restored either way."""
    full, resumed = _dropout_run(tmp_path / "a", [])
    assert resumed == full[2:]
    full, fresh_rng = _dropout_run(tmp_path / "b", ["--no-load-rng"])
    assert len(fresh_rng) == 2 and fresh_rng != full[2:]
    assert abs(fresh_rng[0] - full[2]) < 0.05 * full[2]    # same weights, other masks


def test_no_load_optim_starts_a_fresh_optimizer(tmp_path, capsys):
    full, resumed = _dropout_run(tmp_path, ["--no-load-optim"])
    out = capsys.readouterr().out
    assert "(weights only: fresh optimizer, --no-load-optim)" in out
    assert resumed[0] == full[2]           # same weights, data and RNG: the first loss is equal
    assert resumed[1] != full[3]           # the first step without Adam's moments differs
