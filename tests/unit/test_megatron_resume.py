"""Megatron-LM's stop and checkpoint flags through the real trainer, in one process on mock
data: --exit-interval (stop, exit 0, resume bitwise), --finetune and --pretrained-checkpoint
(weights only, iteration 0), --no-save-optim / --no-save-rng (what is written, and the resume
refused or taken as Megatron-LM does), --ckpt-step, --exit-on-missing-checkpoint, the
learning-rate schedule flags on resume, W&B logging in offline mode.

Same-layout resumes are compared bitwise (float equality of every logged loss and lr).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from megalite.cli import run_main
from megalite.errors import MegaliteError
from megalite.training import main as train_main
from megalite.training.prepare import parse_train_args
from megalite.training.trainer import Trainer, pretrain

TINY = ["--config", "tiny-gpt", "--mock-data", "--num-layers", "2", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1",
        "--eval-interval", "5", "--log-interval", "1", "--hidden-dropout", "0.1",
        "--attention-dropout", "0.1", "--lr-warmup-iters", "3"]


def _records(path, split="train"):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_exit_interval_stops_with_status_0_and_the_resume_continues_bitwise(tmp_path, capsys):
    """A 20-iteration run stopped by --exit-interval 10 and started again with the same command
    gives every loss, lr and validation loss of the uninterrupted run, bit for bit."""
    whole = tmp_path / "whole.jsonl"
    assert run_main(train_main.main, TINY + ["--train-iters", "20", "--log-json", str(whole),
                                             "--log-throughput"]) == 0
    assert "TFLOP/s/device: " in capsys.readouterr().out   # --log-throughput: always logged
    save, pieces = str(tmp_path / "ckpt"), tmp_path / "pieces.jsonl"
    command = TINY + ["--train-iters", "20", "--exit-interval", "10", "--save", save,
                      "--load", save, "--log-json", str(pieces)]
    os.makedirs(save)
    capsys.readouterr()
    assert run_main(train_main.main, command) == 0       # Megatron-LM exits 0 there too
    out = capsys.readouterr().out
    assert "stopping at iteration 10 (exit-interval); checkpoint in " + save in out
    assert sorted(os.listdir(save)) == ["iter_0000010", "latest"]
    assert run_main(train_main.main, command) == 0
    assert "start: resumed from " + save + " at iteration 10; 10 iterations to go (to 20)" in \
        capsys.readouterr().out
    for split in ("train", "valid", "test"):
        a = [(r["iteration"], r["loss"], r.get("lr")) for r in _records(whole, split)]
        b = [(r["iteration"], r["loss"], r.get("lr")) for r in _records(pieces, split)]
        assert a == b and a, split
    assert [r["iteration"] for r in _records(pieces)] == list(range(1, 21))


def _params(trainer):
    return {n: p.detach().clone() for c in trainer.model_chunks for n, p in c.named_parameters()}


def test_finetune_takes_the_weights_only_and_starts_at_iteration_0(tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    pretrain(parse_train_args(TINY + ["--train-iters", "4", "--save", save]))
    resumed = Trainer(parse_train_args(TINY + ["--train-iters", "6", "--load", save]))
    assert resumed.load(save) and resumed.iteration == 4
    tuned = Trainer(parse_train_args(TINY + ["--train-iters", "6", "--load", save,
                                             "--finetune"]))
    assert tuned.start.mode == "finetune" and tuned.weights_only_start
    assert tuned.iteration == 0 and tuned.train_data.consumed_samples == 0
    assert tuned.optimizer.state_dict()["adamw"]["state"] == {}          # fresh optimizer
    ours, theirs = _params(tuned), _params(resumed)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    capsys.readouterr()
    result = pretrain(parse_train_args(TINY + ["--train-iters", "6", "--load", save,
                                               "--finetune"]))
    assert result.iteration == 6 and len(result.losses) == 6
    assert (f"start: initialized the weights from {save} (weights only: iteration 0, fresh "
            "optimizer; --finetune); 6 iterations to go (to 6)") in capsys.readouterr().out


def test_pretrained_checkpoint_until_load_has_its_own(tmp_path, capsys):
    pre, own = str(tmp_path / "pre"), str(tmp_path / "own")
    pretrain(parse_train_args(TINY + ["--train-iters", "4", "--save", pre]))
    os.makedirs(own)
    command = TINY + ["--train-iters", "4", "--save", own, "--load", own,
                      "--pretrained-checkpoint", pre, "--exit-interval", "2"]
    capsys.readouterr()
    assert run_main(train_main.main, command) == 0
    assert (f"initialized the weights from {pre} (weights only: iteration 0, fresh optimizer; "
            f"--pretrained-checkpoint; no checkpoint in --load {own})") in capsys.readouterr().out
    assert run_main(train_main.main, command) == 0        # the requeued job finds its own
    assert f"start: resumed from {own} at iteration 2" in capsys.readouterr().out
    with pytest.raises(MegaliteError, match=f"\\(training.pretrained_checkpoint\\): {own}/x is "
                                            "not a directory"):
        parse_train_args(TINY + ["--pretrained-checkpoint", own + "/x"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MegaliteError, match=f"--pretrained-checkpoint {empty}: no checkpoint"):
        Trainer(parse_train_args(TINY + ["--pretrained-checkpoint", str(empty)]))


def test_no_save_optim_and_no_save_rng_write_neither_and_resume_as_megatron(tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    full = pretrain(parse_train_args(TINY + ["--train-iters", "4", "--save", save,
                                             "--save-interval", "2", "--no-save-optim",
                                             "--no-save-rng"]))
    rank_file = torch.load(os.path.join(save, "iter_0000002", "rank_00000.pt"),
                           weights_only=True)
    assert rank_file["optimizer"] is None and rank_file["rng"] is None
    with open(os.path.join(save, "iter_0000002", "meta.json")) as f:
        extra = json.load(f)["extra"]
    assert extra["saved_optimizer"] is False and extra["saved_rng"] is False
    assert "lr_schedule" not in extra       # Megatron-LM saves its scheduler with the optimizer
    base = TINY + ["--train-iters", "4", "--load", save, "--ckpt-step", "2"]
    with pytest.raises(MegaliteError) as e:
        Trainer(parse_train_args(base))
    assert str(e.value) == (f"--load {save}: its checkpoint was saved with --no-save-optim (no "
                            "optimizer state): resume it with --no-load-optim, or take its "
                            "weights only with --finetune")
    with pytest.raises(MegaliteError, match="saved with --no-save-rng \\(no random states\\): "
                                            "resume it with --no-load-rng"):
        Trainer(parse_train_args(base + ["--no-load-optim"]))
    capsys.readouterr()
    resumed = pretrain(parse_train_args(base + ["--no-load-optim", "--no-load-rng"]))
    assert resumed.iteration == 4 and len(resumed.losses) == 2
    assert "resumed from " + save + " at iteration 2 (weights only: fresh optimizer" in \
        capsys.readouterr().out
    assert resumed.losses != full.losses[2:]        # a fresh optimizer: not the same run
    assert len(pretrain(parse_train_args(base + ["--finetune"])).losses) == 4


def test_ckpt_step_and_exit_on_missing_checkpoint(tmp_path):
    save = str(tmp_path / "ckpt")
    full = pretrain(parse_train_args(TINY + ["--train-iters", "4", "--save", save,
                                             "--save-interval", "2"]))
    again = pretrain(parse_train_args(TINY + ["--train-iters", "4", "--load", save,
                                              "--ckpt-step", "2"]))
    assert again.losses == full.losses[2:]           # bitwise: iterations 3-4 once more
    with pytest.raises(MegaliteError, match=r"^--ckpt-step \(training.ckpt_step\): no "
                                            r"checkpoint for iteration 3 in .* \(complete "
                                            r"checkpoints: \[2, 4\]\)$"):
        parse_train_args(TINY + ["--load", save, "--ckpt-step", "3"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MegaliteError) as e:
        Trainer(parse_train_args(TINY + ["--load", str(empty), "--exit-on-missing-checkpoint"]))
    assert str(e.value) == f"--load {empty}: no checkpoint in it (--exit-on-missing-checkpoint)"


def test_schedule_flags_on_resume(tmp_path, capsys):
    """Resumed with another --lr: this run's is used and named (Megatron-LM would refuse),
    --use-checkpoint-opt_param-scheduler keeps the saved one bit for bit."""
    save, log = str(tmp_path / "ckpt"), tmp_path / "lr.jsonl"
    args = TINY + ["--train-iters", "6", "--lr", "1e-3"]
    pretrain(parse_train_args(args + ["--save", save, "--save-interval", "3",
                                      "--log-json", str(log)]))
    with open(os.path.join(save, "latest"), "w") as f:
        f.write("iter_0000003\n")
    original = [r["lr"] for r in _records(log)][3:]
    capsys.readouterr()
    changed = TINY + ["--train-iters", "6", "--lr", "2e-3", "--load", save]
    log2 = tmp_path / "lr2.jsonl"
    pretrain(parse_train_args(changed + ["--log-json", str(log2)]))
    out = capsys.readouterr().out
    assert ("notice: this run's learning-rate schedule differs from the checkpoint's (lr 0.001 "
            "-> 0.002); using this run's") in out
    from megalite.training.schedule import RunLRSchedule
    new = parse_train_args(changed)
    ours = RunLRSchedule.from_config(new.optim, new.training, 4)
    assert [r["lr"] for r in _records(log2)] == [ours.lr_at(t) for t in (4, 5, 6)]
    assert ours.lr_at(4) != original[0]
    log3 = tmp_path / "lr3.jsonl"
    pretrain(parse_train_args(changed + ["--use-checkpoint-opt_param-scheduler",
                                         "--log-json", str(log3)]))
    assert "learning-rate schedule from the checkpoint" in capsys.readouterr().out
    assert [r["lr"] for r in _records(log3)] == original


def _wandb_records(run_file):
    """The records of an offline W&B run file: W&B's record log (a 7-byte header ':W&B', magic,
    version; 32 KiB blocks of records, each with a 7-byte header CRC32 / length / type: full,
    first, middle, last) of wandb_internal_pb2.Record messages."""
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, part, records = 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:                       # a block's tail too short for a header: padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:                      # zero padding to the end of the block
            pos += room
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                 # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_wandb_offline_gets_the_tensorboard_scalars(tmp_path, monkeypatch):
    """--wandb-project/--wandb-exp-name/--wandb-save-dir: one W&B run in the save dir, named,
    in the project, whose history holds the logged scalars at their iterations (read back from
    the offline run file) and whose config is the run's TrainConfig."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_dir, log = tmp_path / "wb", tmp_path / "l.jsonl"
    pretrain(parse_train_args(TINY + ["--train-iters", "5", "--wandb-project", "megalite-test",
                                      "--wandb-exp-name", "tiny", "--wandb-save-dir",
                                      str(wandb_dir), "--log-json", str(log)]))
    runs = [d for d in os.listdir(wandb_dir / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    (run_file,) = [f for f in os.listdir(wandb_dir / "wandb" / runs[0]) if f.endswith(".wandb")]
    records = _wandb_records(wandb_dir / "wandb" / runs[0] / run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("megalite-test", "tiny")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["training"]["wandb_exp_name"] == "tiny" and config["model"]["num_layers"] == 2
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}
            history[items["_step"]] = items
    assert sorted(history) == [1, 2, 3, 4, 5]
    for record in _records(log):
        step = history[record["iteration"]]
        assert (step["train/loss"], step["train/lr"], step["train/grad_norm"]) == \
            (record["loss"], record["lr"], record["grad_norm"])
    (valid,) = _records(log, "valid")
    assert history[5]["valid/loss"] == valid["loss"] and "test/ppl" in history[5]
