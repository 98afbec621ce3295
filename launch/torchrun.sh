#!/bin/bash
# Pretraining on one or more machines without SLURM, with torchrun (one worker per GPU, or
# NPROC_PER_NODE CPU workers). Flags after the script name go to `megalite train`.
#
# One machine:   NPROC_PER_NODE=4 launch/torchrun.sh --config tiny-gpt --mock-data
# Two machines:  on each, with the same MASTER_ADDR (a host both reach) and NODE_RANK 0 / 1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh --config X.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 launch/torchrun.sh --config X.yaml
# Checkpoints go to CKPT_DIR and a rerun resumes from it. SIGUSR1/SIGTERM/SIGINT to this script
# are passed to torchrun as SIGUSR1, which forwards it to the workers: they finish the current
# iteration, checkpoint and stop; the script then exits 75 so a supervisor can restart it. So
# does a stop by --exit-duration-in-mins (torchrun itself exits 1 then; rank 0 leaves the reason
# in $CKPT_DIR/.megalite-stop, MEGALITE_STOP_FILE).
set -uo pipefail

NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC_PER_NODE" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=1
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CKPT_DIR=${CKPT_DIR:-checkpoints/megalite}
PYTHON=${PYTHON:-python3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}   # seconds the workers get to checkpoint after a signal
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$CKPT_DIR"
export MEGALITE_STOP_FILE="$CKPT_DIR/.megalite-stop"
[ "$NODE_RANK" -ne 0 ] || rm -f "$MEGALITE_STOP_FILE"
child=""
forward_signal() {
    [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null
}
trap forward_signal USR1 TERM INT

# --signals-to-handle: torchrun forwards these to the workers (its default lacks SIGUSR1, and it
# ignores TORCHELASTIC_SIGNALS_TO_HANDLE from the environment), then waits SHUTDOWN_TIMEOUT
# seconds for them to checkpoint and exit.
"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    -m megalite train --save "$CKPT_DIR" --load "$CKPT_DIR" "$@" &
child=$!
# `wait` returns early when a trapped signal arrives; keep waiting until torchrun has ended.
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"; rc=$?
# Only rank 0's stop file proves a clean stop with a checkpoint (a crash after a signal is not).
if [ "$rc" -ne 0 ] && [ -f "$MEGALITE_STOP_FILE" ]; then
    echo "torchrun.sh: $(cat "$MEGALITE_STOP_FILE"); checkpoint in $CKPT_DIR (rerun to" \
         "resume): exit 75" >&2
    exit 75
fi
exit "$rc"
