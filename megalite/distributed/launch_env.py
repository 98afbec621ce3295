"""Rank, world size and rendezvous from however the job was started, then ``torch.distributed``.

Supported launchers, checked in this order (the first whose variables are present wins):

===========  ==========================================  ===================================
launcher     rank / world / local rank                    master address and port
===========  ==========================================  ===================================
torchrun     RANK, WORLD_SIZE, LOCAL_RANK                 MASTER_ADDR, MASTER_PORT (required)
mpirun       Open MPI: OMPI_COMM_WORLD_{RANK,SIZE,        rank 0 picks a free port and
             LOCAL_RANK,LOCAL_SIZE}; MPICH/Hydra:         broadcasts its address and port
             PMI_RANK, PMI_SIZE, MPI_LOCALRANKID          through mpi4py (MASTER_ADDR/PORT
                                                          override)
SLURM srun   SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID    first host of SLURM_STEP_NODELIST
             (only inside a job *step*: SLURM_STEP_ID     (else SLURM_JOB_NODELIST); port
             set; a batch script itself is one process)   10000 + job id mod 20000 unless
                                                          MASTER_PORT is set
none         a single process                             -
===========  ==========================================  ===================================

Open MPI's variables come before SLURM's because an ``mpirun`` inside an allocation inherits
the batch step's SLURM variables, which describe the batch shell, not the MPI ranks.

:func:`init_from_launch_env` exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (so
DeepSpeed and later code see one consistent picture), selects the GPU of the local rank, and
calls ``init_process_group``.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from megalite.distributed.parallel_state import resolve_backend
from megalite.errors import MegaliteError

__all__ = ["LaunchEnv", "expand_hostlist", "slurm_port", "detect_launch_env",
           "init_from_launch_env"]


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process."""

    launcher: str
    """"torchrun", "slurm", "openmpi", "mpich" or "single"."""
    rank: int
    """Global rank, 0 <= rank < world_size."""
    world_size: int
    """Number of processes of the job."""
    local_rank: int
    """Rank among the processes on this node; selects the GPU."""
    master_addr: str | None = None
    """Host of rank 0's rendezvous store; None until known (MPI: after the broadcast)."""
    master_port: int | None = None
    """TCP port of the rendezvous store; None until known."""

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


# ---- SLURM host lists ------------------------------------------------------------------------
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise MegaliteError(f"{what} {text!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise MegaliteError(f"{what} {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise MegaliteError(f"{what} {text!r}: '[' without ']'")
    parts.append(text[start:])
    return parts


def _expand_one(item: str, whole: str, what: str) -> list[str]:
    """``prefix[ranges]rest`` -> hosts; ``rest`` may hold more bracket groups (cartesian)."""
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    numbers = []
    for r in body.split(","):
        m = _RANGE.match(r.strip())
        if not m:
            raise MegaliteError(f"{what} {whole!r}: bad range {r!r} in [{body}] (expected N or "
                                f"N-M)")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise MegaliteError(f"{what} {whole!r}: range {r!r} runs backwards")
        width = len(lo)  # "01-10": zero-padded to the width of the lower bound, as scontrol
        numbers += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    tails = _expand_one(rest, whole, what)
    return [prefix + n + t for n in numbers for t in tails]


def expand_hostlist(hostlist: str, what: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM host list as ``scontrol show hostnames`` does.

    ``"n[1-3,5],gpu-[01-02]"`` -> ``["n1", "n2", "n3", "n5", "gpu-01", "gpu-02"]``; several
    bracket groups in one name give every combination (``"r[1-2]n[1-2]"`` -> r1n1 r1n2 r2n1
    r2n2). Zero padding follows the lower bound's digits; empty entries are skipped. Text after
    the last bracket (``x[1-2]-ib``) is kept, a superset of Slurm 22.05, which rejects it.
    MegaliteError for bad syntax.
    """
    text = hostlist.strip()
    if not text:
        raise MegaliteError(f"{what} is empty")
    hosts = []
    for item in _split_top_level(text, what):
        if item:  # scontrol skips empty entries ("a,,b")
            hosts += _expand_one(item, hostlist, what)
    if not hosts:
        raise MegaliteError(f"{what} {hostlist!r} names no host")
    return hosts


def slurm_port(job_id: int) -> int:
    """Rendezvous port of a SLURM job: 10000 + job id mod 20000, below Linux's ephemeral range
    (32768+), the same on every node and after a requeue (same job id), and different for jobs
    whose ids differ by less than 20000 (two jobs sharing a node do not collide)."""
    return 10000 + job_id % 20000


# ---- detection -------------------------------------------------------------------------------
def _int(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env.get(name)
    if value is None:
        raise MegaliteError(f"{launcher} launch: environment variable {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise MegaliteError(f"{launcher} launch: {name}={value!r} is not an integer") from None


def _checked(launcher: str, rank: int, world: int, local_rank: int, names: str,
             addr=None, port=None) -> LaunchEnv:
    if world < 1:
        raise MegaliteError(f"{launcher} launch: world size {world} < 1 ({names})")
    if not 0 <= rank < world:
        raise MegaliteError(f"{launcher} launch: rank {rank} is outside world size {world} "
                            f"({names}); the environment is inconsistent")
    if not 0 <= local_rank < world:
        raise MegaliteError(f"{launcher} launch: local rank {local_rank} is outside world size "
                            f"{world} ({names})")
    return LaunchEnv(launcher, rank, world, local_rank, addr, port)


def _port(env: Mapping[str, str], default: int | None, launcher: str) -> int | None:
    if "MASTER_PORT" not in env:
        return default
    port = _int(env, "MASTER_PORT", launcher)
    if not 0 < port < 65536:
        raise MegaliteError(f"{launcher} launch: MASTER_PORT={port} is not a TCP port")
    return port


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Work out the launcher and this process's rank from ``environ`` (default os.environ).

    Pure: reads variables only (the MPI address/port exchange happens in
    :func:`init_from_launch_env`). MegaliteError naming the variable for a partial or
    inconsistent environment.
    """
    env = os.environ if environ is None else environ
    torchrun = [v for v in ("RANK", "WORLD_SIZE") if v in env]
    if torchrun:
        if len(torchrun) == 1:
            have, lacks = torchrun[0], ({"RANK", "WORLD_SIZE"} - set(torchrun)).pop()
            raise MegaliteError(f"torchrun-style launch: {have} is set but {lacks} is not; set "
                                "both (or neither, to let megalite read SLURM/MPI variables)")
        rank, world = _int(env, "RANK", "torchrun"), _int(env, "WORLD_SIZE", "torchrun")
        local = _int(env, "LOCAL_RANK", "torchrun") if "LOCAL_RANK" in env else 0
        addr, port = env.get("MASTER_ADDR"), _port(env, None, "torchrun")
        if world > 1 and (addr is None or port is None):
            missing = [n for n, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if v is None]
            raise MegaliteError(f"torchrun-style launch (RANK/WORLD_SIZE set): {', '.join(missing)}"
                                " not set")
        return _checked("torchrun", rank, world, local, "RANK/WORLD_SIZE/LOCAL_RANK", addr, port)

    if "OMPI_COMM_WORLD_SIZE" in env:
        return _checked("openmpi", _int(env, "OMPI_COMM_WORLD_RANK", "Open MPI"),
                        _int(env, "OMPI_COMM_WORLD_SIZE", "Open MPI"),
                        _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI"),
                        "OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK", env.get("MASTER_ADDR"),
                        _port(env, None, "Open MPI"))

    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        rank, world = _int(env, "SLURM_PROCID", "SLURM"), _int(env, "SLURM_NTASKS", "SLURM")
        local = _int(env, "SLURM_LOCALID", "SLURM")
        nodelist_var = ("SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST")
                        else "SLURM_JOB_NODELIST")
        if nodelist_var not in env:
            raise MegaliteError("SLURM launch: SLURM_JOB_NODELIST is not set")
        addr = env.get("MASTER_ADDR") or expand_hostlist(env[nodelist_var], nodelist_var)[0]
        port = _port(env, slurm_port(_int(env, "SLURM_JOB_ID", "SLURM")), "SLURM")
        return _checked("slurm", rank, world, local, "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID",
                        addr, port)

    if "PMI_SIZE" in env:
        local = _int(env, "MPI_LOCALRANKID", "MPICH") if "MPI_LOCALRANKID" in env else 0
        return _checked("mpich", _int(env, "PMI_RANK", "MPICH"), _int(env, "PMI_SIZE", "MPICH"),
                        local, "PMI_RANK/PMI_SIZE/MPI_LOCALRANKID", env.get("MASTER_ADDR"),
                        _port(env, None, "MPICH"))
    return LaunchEnv("single", 0, 1, 0)


# ---- rendezvous and process group -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _own_address() -> str:
    """An address of this host the other ranks can reach: its resolved hostname."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.getfqdn()


def _mpi_rendezvous(le: LaunchEnv) -> LaunchEnv:
    """Rank 0 picks the address and a free port; one MPI broadcast gives them to every rank.

    The port is released before the TCP store binds it again; another process could grab it
    in between, which is unlikely on a compute node and gives a clear bind error if it happens.
    """
    try:
        from mpi4py import MPI
    except ImportError:
        raise MegaliteError(f"launched by mpirun ({le.launcher}) but mpi4py is not installed: "
                            "pip install mpi4py (or launch with torchrun / srun)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != le.world_size or comm.Get_rank() != le.rank:
        raise MegaliteError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, the "
                            f"environment says {le.rank} of {le.world_size}: inconsistent")
    mine = (le.master_addr or _own_address(), le.master_port or _free_port()) \
        if le.rank == 0 else None
    addr, port = comm.bcast(mine, root=0)
    return LaunchEnv(le.launcher, le.rank, le.world_size, le.local_rank, addr, int(port))


def _select_gpu(local_rank: int) -> None:
    count = torch.cuda.device_count()
    # With per-task GPU binding (srun --gpus-per-task=1) every task sees one device: device 0.
    if count == 1:
        torch.cuda.set_device(0)
    elif local_rank < count:
        torch.cuda.set_device(local_rank)
    else:
        raise MegaliteError(f"local rank {local_rank} but only {count} GPU(s) visible on "
                            f"{socket.gethostname()}: start one process per GPU")


def init_from_launch_env(backend: str | None = None, timeout_s: float = 1800.0,
                         environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Detect the launcher, export the torchrun variables, pick the GPU, init the process group.

    ``backend``: None picks NCCL when CUDA is available, else gloo. A single process (no
    launcher, or a world of 1) gets no process group. Returns the resolved :class:`LaunchEnv`;
    a no-op apart from detection when torch.distributed is already initialized.
    """
    le = detect_launch_env(environ)
    if dist.is_initialized() or not le.distributed:
        return le
    backend = resolve_backend(backend)  # an unusable backend fails before any rendezvous
    if le.launcher in ("openmpi", "mpich"):
        le = _mpi_rendezvous(le)
    if torch.cuda.is_available():
        _select_gpu(le.local_rank)
    os.environ.update(RANK=str(le.rank), WORLD_SIZE=str(le.world_size),
                      LOCAL_RANK=str(le.local_rank), MASTER_ADDR=le.master_addr,
                      MASTER_PORT=str(le.master_port))
    dist.init_process_group(backend=backend, init_method=f"tcp://{le.master_addr}:"
                            f"{le.master_port}", rank=le.rank, world_size=le.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return le
