"""``mpirun -n 4`` (Open MPI, as root, oversubscribed on 2 cores) through launch/mpirun.sh:
rank/world from OMPI_COMM_WORLD_*, rendezvous by mpi4py broadcast, gloo training of the same
tiny model with the same losses as the in-process reference."""
import os
import subprocess

from launch_common import (ROOT, assert_close_to_reference, ensure_packages,
                           losses_by_iteration, reference_losses, train_args)


def test_mpirun_trains_like_one_process(tmp_path):
    ensure_packages()
    log = str(tmp_path / "mpi.jsonl")
    env = {**os.environ, "NP": "4", "OVERSUBSCRIBE": "1", "CKPT_DIR": str(tmp_path / "ckpt"),
           "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "mpirun.sh"), *train_args(log)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_close_to_reference(losses_by_iteration(log), reference_losses(str(tmp_path)))
    # the run checkpointed at the end, where a rerun would resume
    assert open(tmp_path / "ckpt" / "latest").read().strip() == "iter_0000060"
