#!/bin/bash
# Pretraining on one or more machines without SLURM, with torchrun (one worker per GPU, or
# NPROC_PER_NODE CPU workers). Flags after the script name go to `megalite train`.
#
# One machine:   NPROC_PER_NODE=4 launch/torchrun.sh --config configs/tiny-gpt.yaml --mock-data
# Two machines:  on each, with the same MASTER_ADDR (a host both reach) and NODE_RANK 0 / 1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh --config X.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 launch/torchrun.sh --config X.yaml
# Checkpoints go to CKPT_DIR and a rerun resumes from it. SIGUSR1/SIGTERM to torchrun (handled
# and passed to the workers, see TORCHELASTIC_SIGNALS_TO_HANDLE) checkpoints and stops; the
# script then exits 75 so a supervisor can restart it.
set -uo pipefail

NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC_PER_NODE" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=1
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CKPT_DIR=${CKPT_DIR:-checkpoints/megalite}
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megalite train --save "$CKPT_DIR" --load "$CKPT_DIR" "$@"
