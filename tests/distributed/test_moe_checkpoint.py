"""A mixture-of-experts run saved under expert parallelism and resumed under other layouts
(4 gloo processes, the built-in corpus, the tiny LLaMA-recipe MoE model of
test_moe_layouts.py with 4 experts, top-2, the aux loss on, no dropout):

* saved at EP=2 (dp 4: expert ranks 0 and 1 each write their experts' file) and resumed from
  its iteration-3 checkpoint under the same layout: iterations 4-6 are the uninterrupted run's,
  float for float (weights, AdamW state of every expert, RNG and data position restored);
* resumed under EP=4, EP=1 (plain DP=4: every rank loads all experts by their global names),
  TP=2 x EP=2 and PP=2 x EP=2: within 1e-4 relative of the uninterrupted run (the layout
  tests' tolerance: summation order only; a lost or misplaced expert's weights or optimizer
  state moves the loss by far more);
* saved without expert parallelism (DP=4) and resumed at EP=4: within 1e-4 likewise;
* saved with ZeRO-1 at EP=2 (each expert's state partitioned over its expert-dp pair, the
  dense state over all four ranks): resumed float for float under the same layout, and by
  parameter name within 1e-4 under EP=4 with ZeRO-1, at EP=2 with ZeRO off, and at EP=4
  after `megalite convert reshard` (which writes megalite's optimizer state);
* after `megalite convert reshard --target-expert-model-parallel-size` 4 (or 1): the losses
  of the online resume under that size, float for float (the same tensors).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import DistributedWorkers
from layout_common import train_and_rewind

CONFIG = str(Path(__file__).resolve().parents[2] / "megalite" / "configs" / "tiny-llama.yaml")


@pytest.fixture(scope="module")
def group():
    with DistributedWorkers(4, timeout=600) as w:
        yield w


def argv(data, tp: int, pp: int, ep: int, *extra: str) -> list[str]:
    prefix, sp_model = data
    return ["--config", CONFIG, "--num-layers", "2", "--data-path", prefix, "--split", "98,2,0",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48",
            "--moe-aux-loss-coeff", "0.01", "--micro-batch-size", "1",
            "--global-batch-size", "8", "--seq-length", "64", "--lr", "2e-3",
            "--lr-warmup-iters", "1", "--log-interval", "100", "--eval-iters", "0",
            "--seed", "5", "--train-iters", "6", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--expert-model-parallel-size", str(ep),
            *extra]


def _save(group, data, directory: str, ep: int, *extra: str) -> list[float]:
    full = group.run(train_and_rewind, argv(data, 1, 1, ep, "--save", directory,
                                            "--save-interval", "3", *extra),
                     1, 1, directory, 3, ep)
    assert all(c == full[0] for c in full) and len(full[0]) == 6
    return full[0]


@pytest.fixture(scope="module")
def saved(group, corpus_token_dataset, sp_model, tmp_path_factory):
    """(data, the EP=2 run's directory with ``latest`` at iteration 3, its 6 losses)."""
    data = (corpus_token_dataset, sp_model)
    directory = str(tmp_path_factory.mktemp("moe_ckpt") / "run")
    full = _save(group, data, directory, 2)
    assert (Path(directory) / "iter_0000003" / "model_tp00_pp00_ep01.safetensors").is_file()
    return data, directory, full


def resumed(group, data, directory, tp, pp, ep, *extra: str):
    runs = group.run(train_and_rewind, argv(data, tp, pp, ep, "--load", directory, *extra),
                     tp, pp, None, None, ep)
    assert all(r == runs[0] for r in runs)
    return runs[0]


def _close(ref: list[float], other: list[float]) -> None:
    assert len(other) == 3
    for a, b in zip(ref, other, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, other)


def test_resume_is_bitwise(group, saved):
    data, directory, full = saved
    assert resumed(group, data, directory, 1, 1, 2) == full[3:]


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 4), (1, 1, 1), (2, 1, 2), (1, 2, 2)],
                         ids=["ep4", "ep1-dp4", "tp2-ep2", "pp2-ep2"])
def test_resume_under_another_layout(group, saved, tp, pp, ep):
    data, directory, full = saved
    _close(full[3:], resumed(group, data, directory, tp, pp, ep))


def test_dense_data_parallel_checkpoint_resumes_under_expert_parallelism(group, saved,
                                                                         tmp_path):
    data, _, _ = saved
    directory = str(tmp_path / "dp4")
    full = _save(group, data, directory, 1)
    _close(full[3:], resumed(group, data, directory, 1, 1, 4))


def test_zero1_state_with_expert_parallelism_resumes(group, saved, tmp_path):
    data, _, uninterrupted = saved
    directory = str(tmp_path / "zero1")
    full = _save(group, data, directory, 2, "--zero-stage", "1")
    assert abs(full[0] - uninterrupted[0]) <= 1e-5 * abs(full[0])   # same model, same batch
    assert resumed(group, data, directory, 1, 1, 2, "--zero-stage", "1") == full[3:]
    _close(full[3:], resumed(group, data, directory, 1, 1, 4, "--zero-stage", "1"))
    _close(full[3:], resumed(group, data, directory, 1, 1, 2))
    # offline: the partitions reassembled into megalite's optimizer state at EP=4
    from megalite.convert.cli import main as convert
    target = str(tmp_path / "zero1-ep4")
    assert convert(["reshard", "--load", directory, "--save", target,
                    "--target-expert-model-parallel-size", "4"]) == 0
    _close(full[3:], resumed(group, data, target, 1, 1, 4))


@pytest.mark.parametrize("ep", [4, 1])
def test_offline_reshard_resumes_like_online(group, saved, tmp_path, ep):
    """``megalite convert reshard --target-expert-model-parallel-size`` writes what an online
    resume under that expert-parallel size loads: the same losses, float for float."""
    from megalite.convert.cli import main as convert
    data, directory, _ = saved
    online = resumed(group, data, directory, 1, 1, ep)
    target = str(tmp_path / f"ep{ep}")
    assert convert(["reshard", "--load", directory, "--save", target,
                    "--target-expert-model-parallel-size", str(ep)]) == 0
    files = sorted(p.name for p in (Path(target) / "iter_0000003").glob("model_*"))
    assert files == ["model_tp00_pp00.safetensors"] + [
        f"model_tp00_pp00_ep{e:02d}.safetensors" for e in range(1, ep)]
    assert resumed(group, data, target, 1, 1, ep) == online
