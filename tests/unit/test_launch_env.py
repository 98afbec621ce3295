"""Launcher detection (pure: environments passed as dicts) and SLURM host-list expansion.

The host-list expansion is also compared with the real ``scontrol show hostnames`` in
tests/integration/test_slurm.py; real multi-process starts under srun and mpirun are tested
there and in test_mpirun.py.
"""
import pytest

from megalite.distributed.launch_env import (LaunchEnv, detect_launch_env, expand_hostlist,
                                             init_from_launch_env, slurm_port)
from megalite.errors import MegaliteError

# the environment of task 3 of `srun -N 2 -n 4` as observed on the local test cluster
SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3",
              "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_STEP_NODELIST": "gpu-[07-08]"}


@pytest.mark.parametrize("hostlist,expected", [
    ("n[1-3,5],gpu-[01-02]", ["n1", "n2", "n3", "n5", "gpu-01", "gpu-02"]),
    ("node1", ["node1"]),
    ("a,b,c", ["a", "b", "c"]),
    ("node[009-011]", ["node009", "node010", "node011"]),  # width of the lower bound, 010 not 10
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),     # several groups: every combination
    ("x[3]-ib", ["x3-ib"]),                                 # text after the brackets
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[1-2],,m", ["n1", "n2", "m"]),                       # empty entries skipped, as scontrol
])
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("hostlist,message", [
    ("", "empty"), ("n[1-", "without"), ("n1]", "without"), ("n[3-1]", "backwards"),
    ("n[a-b]", "bad range"), (",", "names no host"), ("n[[1]]", "nested"),
])
def test_expand_hostlist_errors(hostlist, message):
    with pytest.raises(MegaliteError, match=message):
        expand_hostlist(hostlist)


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
           "MASTER_PORT": "29501", **SLURM_STEP}  # torchrun under srun: torchrun's variables win
    assert detect_launch_env(env) == LaunchEnv("torchrun", 5, 8, 1, "h0", 29501)


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0"}, "WORLD_SIZE is not"),
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside world"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR not set"),
    ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK='zero' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "not a TCP"),
])
def test_torchrun_bad_environment(env, message):
    with pytest.raises(MegaliteError, match=message):
        detect_launch_env(env)


def test_slurm_step():
    le = detect_launch_env(SLURM_STEP)
    assert le == LaunchEnv("slurm", 3, 4, 1, "gpu-07", slurm_port(4242))
    assert slurm_port(4242) == 14242 and slurm_port(24242) == 14242  # 10000 + id mod 20000
    # MASTER_PORT / MASTER_ADDR exported by the user win
    le = detect_launch_env({**SLURM_STEP, "MASTER_PORT": "1234", "MASTER_ADDR": "ib0"})
    assert (le.master_addr, le.master_port) == ("ib0", 1234)
    # a step on a subset of the nodes: its own node list gives the master
    le = detect_launch_env({**SLURM_STEP, "SLURM_STEP_NODELIST": "gpu-08"})
    assert le.master_addr == "gpu-08"


def test_slurm_batch_script_is_one_process():
    # In the batch script (no srun step) SLURM_PROCID=0 and SLURM_NTASKS=4 are set too, but it
    # is one process: treating it as rank 0 of 4 would hang waiting for 3 peers.
    batch = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    batch["SLURM_PROCID"] = "0"
    assert detect_launch_env(batch) == LaunchEnv("single", 0, 1, 0)


@pytest.mark.parametrize("change,message", [
    ({"SLURM_PROCID": "4"}, "rank 4 is outside world size 4"),
    ({"SLURM_NTASKS": None}, "SLURM_NTASKS is not set"),
    ({"SLURM_JOB_NODELIST": None, "SLURM_STEP_NODELIST": None}, "SLURM_JOB_NODELIST"),
    ({"SLURM_STEP_NODELIST": "gpu-[07-"}, "SLURM_STEP_NODELIST"),
    ({"SLURM_LOCALID": "-1"}, "local rank -1"),
])
def test_slurm_bad_environment(change, message):
    env = {**SLURM_STEP, **change}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(MegaliteError, match=message):
        detect_launch_env(env)


def test_mpi_variables():
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    # mpirun inside an allocation inherits the batch step's SLURM variables: MPI's win
    assert detect_launch_env({**SLURM_STEP, **ompi}) == LaunchEnv("openmpi", 2, 4, 0)
    mpich = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}
    assert detect_launch_env(mpich) == LaunchEnv("mpich", 1, 2, 1)
    with pytest.raises(MegaliteError, match="OMPI_COMM_WORLD_LOCAL_RANK is not set"):
        detect_launch_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(MegaliteError, match="rank 2 is outside world size 2"):
        detect_launch_env({"PMI_RANK": "2", "PMI_SIZE": "2"})


def test_single_process_gets_no_process_group():
    import torch.distributed as dist

    assert detect_launch_env({}) == LaunchEnv("single", 0, 1, 0)
    assert init_from_launch_env(environ={}).world_size == 1
    assert not dist.is_initialized()
