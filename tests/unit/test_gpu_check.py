"""benchmarks/gpu_check.py, the first-GPU check, in its ``--cpu`` smoke mode (what CI can run).

The GPU machine it is meant for has no DeepSpeed, megatron-core or sentencex and no built
``megalite._C``, so the smoke run happens in a subprocess where those cannot be imported (a
``sitecustomize`` putting None into ``sys.modules``; checked to take effect first). The JSON
must hold every phase's fields: parity within the script's stated tolerances (fp32: 1e-3 on
logits of order 1; bf16: 3x Hugging Face's own bf16-vs-fp32 distance), megalite's FLOPs formula
behind TFLOP/s, losses starting at ln(vocab) (a real model trained), the ``--dry-run`` memory
estimate. Times are reported, never asserted.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from megalite.model import get_preset
from megalite.model.flops import flops_per_iteration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
BLOCKED = ("deepspeed", "megatron", "megatron.core", "sentencex", "megalite._C")
SHIM = ("import sys\nfor _name in {!r}:\n    sys.modules[_name] = None\n").format(BLOCKED)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "sitecustomize.py").write_text(SHIM)
    env = dict(os.environ, PYTHONPATH=f"{tmp}{os.pathsep}{REPO}")
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib, sys\nfor n in sys.argv[1:]:\n    try:\n"
         "        importlib.import_module(n)\n    except ImportError:\n        continue\n"
         "    sys.exit('importable: ' + n)", *BLOCKED], env=env, capture_output=True,
        text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr      # the shim really blocks them
    out = tmp / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    printed = json.loads(proc.stdout[proc.stdout.rindex('{\n "benchmark"'):])
    assert printed == report
    return report, proc.stderr


def test_every_phase_ran(smoke):
    report, log = smoke
    status = {k: v["status"] for k, v in report["phases"].items()}
    assert status.pop("train_compiled") in ("ok", "skipped")
    assert status == {"env": "ok", "sdpa": "ok", "parity": "ok", "train_eager": "ok"}, \
        {k: v.get("error") for k, v in report["phases"].items()}
    assert report["summary"]["phase_status"]["train_eager"] == "ok"
    for phase in report["phases"]:                   # a timestamped progress line per phase
        assert f"] {phase}: start" in log


def test_compiled_phase_follows_the_option(smoke):
    report, _ = smoke
    compiled = report["phases"]["train_compiled"]
    if load_script().compile_available():
        assert compiled["status"] == "ok", compiled.get("error")
        assert "--compile" in compiled["argv"]
    else:
        assert compiled["skipped"] == "--compile not available"


def test_parity_within_tolerance(smoke):
    report, _ = smoke
    par = report["phases"]["parity"]
    script = load_script()
    assert par["fp32"]["max_abs_logit"] > 1.0           # a sensitive comparison
    assert par["fp32"]["max_abs_diff"] <= script.FP32_TOL == par["fp32"]["tol"]
    bf16 = par["bf16"]
    assert bf16["tol"] == pytest.approx(script.BF16_FLOOR_FACTOR * bf16["hf_bf16_vs_fp32"])
    assert 0 < bf16["max_abs_diff"] <= bf16["tol"]
    assert par["ok"] and report["summary"]["parity_ok"]


def test_training_figures_use_megalites_formula(smoke):
    report, _ = smoke
    tr = report["phases"]["train_eager"]
    args = report["args"]
    cfg = get_preset(args["preset"]).replace(seq_length=args["seq_length"])
    assert tr["model_flops_per_step"] == flops_per_iteration(cfg, args["global_batch_size"],
                                                             args["seq_length"])
    assert tr["tokens_per_step"] == args["global_batch_size"] * args["seq_length"]
    assert tr["param_dtype"] == "torch.bfloat16"
    assert len(tr["losses"]) == args["warmup"] + args["steps"]
    assert len(tr["step_s_all"]) == args["steps"]
    # megalite's own loop ran its --steps iterations after the timed ones, and kept training
    assert len(tr["loop_losses"]) == args["steps"]
    assert all(math.isfinite(x) for x in tr["loop_losses"])
    assert tr["loop_step_s_mean"] > 0 and tr["train_step_over_loop"] > 0
    assert abs(tr["losses"][0] - math.log(cfg.vocab_size)) < 0.5   # a fresh model's loss
    assert tr["tokens_per_s"] > 0 and tr["tflops"] > 0 and tr["mfu"] > 0
    assert tr["peak_tflops"] == 989.0
    mem = tr["memory"]
    assert mem["estimate_gib"] > 0 and "attention scores" in mem["attention_scores"]
    assert mem["peak_gib"] > 0


def test_sdpa_backend_reported(smoke):
    report, _ = smoke
    sdpa = report["phases"]["sdpa"]
    assert sdpa["default_backend"] in ("flash", "efficient", "cudnn", "math")
    assert sdpa["backends"]["math"]["backend"] == "math"   # forced backends really switch
    assert report["phases"]["train_eager"]["sdpa_backend"] in ("flash", "efficient", "cudnn",
                                                               "math")


def test_phase_errors_are_recorded_and_the_file_kept_current(tmp_path):
    script = load_script()
    path = tmp_path / "r.json"
    report = script.Report(str(path), Namespace(cpu=True), 0.0)
    cpu = torch.device("cpu")

    def broken():
        raise ValueError("no such kernel")

    def interrupted():
        raise script.Interrupted("SIGTERM")

    assert report.run("a", lambda: {"x": 1}, cpu, budget_s=1e9)["status"] == "ok"
    assert report.run("b", broken, cpu, budget_s=1e9)["error"] == "ValueError: no such kernel"
    with pytest.raises(script.Interrupted):
        report.run("c", interrupted, cpu, budget_s=1e9)
    saved = json.loads(path.read_text())["phases"]
    assert [saved[k]["status"] for k in "abc"] == ["ok", "error", "interrupted"]
    assert saved["a"]["x"] == 1
    assert report.run("d", lambda: {"x": 2}, cpu, budget_s=0.0)["status"] == "skipped"
    assert json.loads(path.read_text())["phases"]["d"]["status"] == "skipped"
