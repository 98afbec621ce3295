#!/bin/bash
# Pretraining with mpirun (Open MPI or MPICH) on machines without SLURM; rank 0 picks a free port
# and tells the others through mpi4py (pip install mpi4py). Flags after the script name go to
# `megalite train`.
#
#   NP=4 launch/mpirun.sh --config tiny-gpt --mock-data
#   NP=16 HOSTFILE=hosts.txt launch/mpirun.sh --config X.yaml      (hosts.txt: "host slots=8")
# Open MPI as root needs --allow-run-as-root (added when running as root); more ranks than cores
# needs OVERSUBSCRIBE=1. mpirun forwards SIGUSR1 to the ranks: they checkpoint to CKPT_DIR and
# exit 75; rerunning resumes. (Send SIGUSR1, not SIGTERM: on SIGTERM Open MPI kills the ranks a
# few seconds later, which may be before the checkpoint is written.)
set -uo pipefail

NP=${NP:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NP" -gt 0 ] 2>/dev/null || NP=1
HOSTFILE=${HOSTFILE:-""}
OVERSUBSCRIBE=${OVERSUBSCRIBE:-0}
CKPT_DIR=${CKPT_DIR:-checkpoints/megalite}
PYTHON=${PYTHON:-python3}
MPIRUN=${MPIRUN:-mpirun}

args=(-n "$NP")
if "$MPIRUN" --version 2>&1 | grep -q "Open MPI"; then
    [ "$(id -u)" -eq 0 ] && args+=(--allow-run-as-root)
    [ "$OVERSUBSCRIBE" = 1 ] && args+=(--oversubscribe)
    [ -n "$HOSTFILE" ] && args+=(--hostfile "$HOSTFILE")
    args+=(-x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x PATH)
    [ -n "${PYTHONPATH:-}" ] && args+=(-x PYTHONPATH)
    # TCP between ranks (Open MPI's shared-memory transport is not needed: torch does the
    # heavy communication; MPI only carries the rendezvous broadcast)
    args+=(--mca btl self,tcp)
else  # MPICH / Hydra
    [ -n "$HOSTFILE" ] && args+=(-f "$HOSTFILE")
    args+=(-genv OMP_NUM_THREADS "${OMP_NUM_THREADS:-1}")
fi

mkdir -p "$CKPT_DIR"   # --load of a missing directory is an error; an empty one starts fresh
exec "$MPIRUN" "${args[@]}" "$PYTHON" -m megalite train --save "$CKPT_DIR" --load "$CKPT_DIR" "$@"
