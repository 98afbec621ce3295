"""launch/torchrun.sh (4 CPU workers on this machine): a SIGUSR1 to the script mid-run makes
torchrun forward it to the workers, which finish the iteration, checkpoint and stop; the script
exits 75; running it again resumes from the checkpoint and trains to the end with the losses of
the in-process reference (1e-5 relative, see launch_common). A stop by --exit-duration-in-mins
exits 75 too."""
import os
import re
import signal
import subprocess
import time

import pytest

from harness import free_port
from launch_common import (ROOT, TRAIN_ITERS, assert_close_to_reference,
                           losses_by_iteration, reference_losses, train_args)


def _start(tmp_path, log, *extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}
    env.update(NPROC_PER_NODE="4", CKPT_DIR=str(tmp_path / "ckpt"), OMP_NUM_THREADS="1",
               MASTER_PORT=str(free_port()))
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "torchrun.sh"),
                             *train_args(log), *extra], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(1300)
def test_signal_checkpoints_exits_75_and_rerun_resumes(tmp_path):
    log = str(tmp_path / "log.jsonl")
    proc = _start(tmp_path, log)
    deadline = time.monotonic() + 300
    while not (os.path.exists(log) and len(losses_by_iteration(log)) >= 5):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    stop = re.search(r"stopping at iteration (\d+) \(signal\)", out)
    assert stop and 5 <= int(stop.group(1)) < TRAIN_ITERS, out[-3000:]
    assert open(tmp_path / "ckpt" / "latest").read().strip() == f"iter_{int(stop.group(1)):07d}"
    proc = _start(tmp_path, log)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {tmp_path / 'ckpt'} at iteration {stop.group(1)}" in out
    assert_close_to_reference(losses_by_iteration(log), reference_losses(str(tmp_path)))


@pytest.mark.timeout(1000)
def test_exit_duration_stop_also_exits_75(tmp_path):
    """--exit-duration-in-mins: no signal reaches the script, torchrun exits 1 for its workers'
    75, and the stop file rank 0 wrote tells the script it was a clean stop."""
    log = str(tmp_path / "log.jsonl")
    proc = _start(tmp_path, log, "--exit-duration-in-mins", "0.0001")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert re.search(r"torchrun.sh: stopped at iteration \d+ \(time\); checkpoint in", out), \
        out[-3000:]
    proc = _start(tmp_path, log)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resumed from" in out, out[-3000:]
    assert_close_to_reference(losses_by_iteration(log), reference_losses(str(tmp_path)))
