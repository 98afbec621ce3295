"""MetricsLogger (console, JSON lines, TensorBoard read back), peak FLOP/s, throughput/MFU."""
from __future__ import annotations

import io
import json
import math
import os

import pytest
import torch

from megalite.errors import MegaliteError
from megalite.training.metrics import (MetricsLogger, device_peak_flops, format_train_line,
                                       measure_matmul_flops, peak_memory_gib, peak_memory_kind,
                                       table_peak_tflops, throughput_metrics)

METRICS = {
    "iteration": 10, "consumed_samples": 80, "loss": 5.123, "lr": 3e-4, "grad_norm": 1.234,
    "loss_scale": 1.0, "skipped_iters": 0, "iteration_time_s": 0.1234, "tokens_per_s": 1234.0,
    "tflops_per_device": 1.23, "mfu": 0.0123, "peak_memory_gib": 0.12,
}


def test_console_line_has_every_field():
    line = format_train_line(10, METRICS, train_iters=100)
    for text in ("iteration       10/     100", "consumed samples: 80", "lr: 3.000E-04",
                 "loss: 5.123000", "grad norm: 1.2340", "loss scale: 1.0", "skipped: 0",
                 "time/iter (ms): 123.4", "tokens/s: 1234", "TFLOP/s/device: 1.230",
                 "MFU: 1.23%", "peak mem (GiB): 0.120"):
        assert text in line, (text, line)
    assert line.count(" | ") == 11


def test_logger_writes_console_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = io.StringIO()
    log_json, tb_dir = tmp_path / "logs" / "run.jsonl", tmp_path / "tb"
    with MetricsLogger(enabled=True, log_json=str(log_json), tensorboard_dir=str(tb_dir),
                       train_iters=20, stream=out) as logger:
        logger.log_train(10, METRICS)
        # the file is flushed after every record (readable while training runs)
        assert json.loads(log_json.read_text().splitlines()[0])["loss"] == 5.123
        logger.log_train(20, {**METRICS, "iteration": 20, "loss": 4.5, "lr": 1e-4})
        logger.log_eval(20, "valid", 4.0)
        logger.log_eval(20, "test", float("nan"))

    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith(" iteration       10/      20 |")
    assert "validation loss at iteration 20 | lm loss: 4.000000" in lines[2]
    assert f"lm loss PPL: {math.exp(4.0):.4f}" in lines[2]
    assert lines[3].startswith(" test loss at iteration 20 | lm loss: nan")

    records = [json.loads(l) for l in log_json.read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in records] == [
        ("train", 10), ("train", 20), ("valid", 20), ("test", 20)]
    assert {k: records[0][k] for k in METRICS} == METRICS
    assert records[1]["loss"] == 4.5 and records[1]["lr"] == 1e-4
    assert records[2]["loss"] == 4.0 and records[2]["ppl"] == pytest.approx(math.exp(4.0))
    assert records[3]["loss"] is None and records[3]["ppl"] is None   # nan -> null (valid JSON)

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in METRICS if k != "iteration"} <= tags
    assert {"valid/loss", "valid/ppl", "test/loss"} <= tags
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(10, pytest.approx(5.123)), (20, pytest.approx(4.5))]
    assert [(e.step, e.value) for e in acc.Scalars("train/mfu")] == [
        (10, pytest.approx(0.0123)), (20, pytest.approx(0.0123))]
    assert [(e.step, e.value) for e in acc.Scalars("valid/loss")] == [(20, 4.0)]


def test_jsonl_is_appended_by_a_resumed_run(tmp_path):
    path = tmp_path / "run.jsonl"
    for it in (1, 2):
        with MetricsLogger(enabled=True, log_json=str(path), stream=io.StringIO()) as logger:
            logger.log_train(it, {"loss": float(it)})
    assert [json.loads(l)["iteration"] for l in path.read_text().splitlines()] == [1, 2]


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    logger = MetricsLogger(enabled=False, log_json=str(tmp_path / "x.jsonl"),
                           tensorboard_dir=str(tmp_path / "tb"))
    logger.log_train(1, METRICS)
    logger.log_eval(1, "valid", 1.0)
    logger.close()
    assert os.listdir(tmp_path) == [] and capsys.readouterr().out == ""


def test_unwritable_log_json_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MegaliteError, match="--log-json"):
        MetricsLogger(enabled=True, log_json=str(blocker / "run.jsonl"))


def test_throughput_metrics_by_hand():
    # 6e12 FLOPs per iteration in 2 s on 3 devices: 1e12 FLOP/s per device; 4096 tokens.
    m = throughput_metrics(6e12, 4096, 2.0, 3, peak_flops=4e12)
    assert m == {"tokens_per_s": 2048.0, "tflops_per_device": 1.0, "mfu": 0.25}
    with pytest.raises(MegaliteError):
        throughput_metrics(1.0, 1, 0.0, 1, 1.0)


def test_peak_flops_override_and_table():
    assert device_peak_flops(torch.bfloat16, override_tflops=2.5) == (2.5e12, "--peak-tflops 2.5")
    with pytest.raises(MegaliteError, match="--peak-tflops"):
        device_peak_flops(torch.float32, override_tflops=0.0)
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert table_peak_tflops("NVIDIA H100 PCIe", torch.float16) == 756.5
    assert table_peak_tflops("NVIDIA H200", torch.bfloat16) == 989.4
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == 156.0
    assert table_peak_tflops("NVIDIA L4", torch.bfloat16) == 121.0
    assert table_peak_tflops("NVIDIA L40S", torch.bfloat16) == 362.1
    assert table_peak_tflops("Tesla V100-SXM2-32GB", torch.bfloat16) is None  # no bf16: measure
    assert table_peak_tflops("Some Future GPU", torch.bfloat16) is None


def test_cpu_peak_is_measured_once_per_process():
    flops, source = device_peak_flops(torch.float32, device="cpu")
    # between 0.1 GFLOP/s and 100 TFLOP/s: no CPU core set does fp32 matmuls outside that
    assert 1e8 < flops < 1e14 and source.startswith("measured: 1024x1024 float32 matmul on cpu")
    assert device_peak_flops(torch.float32, device="cpu") == (flops, source)  # cached
    assert 1e8 < measure_matmul_flops(torch.float32, "cpu", seconds=0.0) < 1e14


def test_peak_memory_on_cpu_is_the_process_peak_rss():
    import psutil

    assert peak_memory_kind("cpu") == "process_peak_rss"
    current = psutil.Process().memory_info().rss / 2 ** 30    # independent reading, GiB
    peak = peak_memory_gib("cpu")
    # the peak is at least today's resident size (a KiB/byte mix-up would be off by 1024)
    assert current * 0.99 <= peak < current * 100
