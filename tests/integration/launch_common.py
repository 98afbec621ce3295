"""Shared by test_slurm.py and test_mpirun.py: the tiny run every launcher trains, its
in-process reference losses, and reading a run's --log-json."""
from __future__ import annotations

import json
import os
import subprocess

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRAIN_ITERS = 60


def train_args(log_json: str) -> list[str]:
    """tiny-gpt (4 layers, hidden 64) on mock data; global batch 16 = micro 4 x DP 4 on 4 ranks.
    --peak-tflops skips measuring the CPU for MFU; one log line (loss) per iteration."""
    return ["--config", os.path.join(ROOT, "megalite", "configs", "tiny-gpt.yaml"), "--mock-data",
            "--train-iters", str(TRAIN_ITERS), "--lr-warmup-iters", "4", "--eval-iters", "0",
            "--log-interval", "1", "--peak-tflops", "1", "--log-json", log_json]


def losses_by_iteration(log_json: str) -> dict[int, float]:
    """{iteration: loss} from a --log-json file; a resumed run's later lines win (they are the
    ones the final model came from)."""
    out = {}
    with open(log_json) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == "train":
                out[int(rec["iteration"])] = float(rec["loss"])
    return out


def reference_losses(tmp_dir: str) -> dict[int, float]:
    """The same config trained in this process (one rank: 4 microbatches accumulated instead
    of 4 DP ranks), one intra-op thread like the launched ranks."""
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import pretrain

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = pretrain(parse_train_args(train_args(os.path.join(tmp_dir, "ref.jsonl"))))
    finally:
        torch.set_num_threads(n)
    return {i + 1: loss for i, loss in enumerate(result.losses)}


def assert_close_to_reference(losses: dict[int, float], reference: dict[int, float]) -> None:
    """1e-5 relative: DP 4 sums the four microbatch gradients in another order than one rank
    accumulating them (fp32 rounding, ~1e-7 per step), and the difference grows slowly over 60
    Adam steps; a wrong sample order, LR or gradient scale moves the loss by >1e-3."""
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    for i, ref in reference.items():
        assert abs(losses[i] - ref) <= 1e-5 * abs(ref), (i, losses[i], ref)


def ensure_packages() -> None:
    """Install SLURM, Open MPI and mpi4py if missing (apt-get update first); fail loudly if
    that is impossible (no skip: CI must run these tests)."""
    r = subprocess.run(["bash", os.path.join(ROOT, ".ci", "slurm.sh"), "install"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f".ci/slurm.sh install failed:\n{r.stdout}\n{r.stderr}"
