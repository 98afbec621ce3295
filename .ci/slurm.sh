#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the integration tests (and for trying
# the launch scripts by hand). Needs root (Debian; CI is a fresh machine like this one).
#
#   .ci/slurm.sh install      apt-get install slurmctld slurmd slurm-client openmpi-bin if any
#                             is missing (apt-get update first); fails loudly if apt cannot.
#   .ci/slurm.sh start DIR    install, write DIR/slurm.conf, start slurmctld and two slurmd
#                             "nodes" (mln1, mln2: 4 CPUs each, both 127.0.0.1), wait until idle
#                             (at most SLURM_START_TIMEOUT_S, default 60 s; else logs, exit 1).
#                             Prints SLURM_CONF=DIR/slurm.conf; export it for sinfo/sbatch/...
#   .ci/slurm.sh stop DIR     scontrol shutdown, then kill what is left by the PIDs in DIR,
#                             and remove the /etc/hosts line `start` added.
#
# Authentication is auth/none + cred/none (no munge daemon to run). Ports are picked free at
# start, so two clusters (two test sessions) on one machine do not collide. Facts behind each
# setting: shared/notes/slurm-local.md.
set -euo pipefail

NODES=(mln1 mln2)
HOSTS_TAG="# megalite-slurm-test"

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v mpirun >/dev/null || missing+=(openmpi-bin)
    if ((${#missing[@]})); then
        echo "slurm.sh: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    python3 -c "import mpi4py" 2>/dev/null || python3 -m pip install -q mpi4py
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])'; }

start() {
    local d=$1
    install_packages
    mkdir -p "$d/state" "$d/spool" "$d/tmp" "$d/log"
    for n in "${NODES[@]}"; do mkdir -p "$d/spool/$n" "$d/tmp/$n"; done
    local host; host=$(hostname -s)
    local pc p1 p2
    pc=$(free_port); p1=$(free_port); p2=$(free_port)
    cat >"$d/slurm.conf" <<EOF
ClusterName=megalite
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${pc}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool/%n
TmpFS=$d/tmp/%n
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd-%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=30
KillWait=30
JobRequeue=1
NodeName=mln1 NodeAddr=127.0.0.1 NodeHostname=${host} Port=${p1} CPUs=4 State=UNKNOWN
NodeName=mln2 NodeAddr=127.0.0.1 NodeHostname=${host} Port=${p2} CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=mln1,mln2 Default=YES MaxTime=INFINITE State=UP
EOF
    # The node names must resolve (srun looks them up); one tagged line, removed by `stop`.
    if ! grep -q "$HOSTS_TAG $d\$" /etc/hosts; then
        echo "127.0.0.1 ${NODES[*]} $HOSTS_TAG $d" >>/etc/hosts
    fi
    export SLURM_CONF=$d/slurm.conf
    slurmctld -c -i -f "$SLURM_CONF"
    for n in "${NODES[@]}"; do slurmd -f "$SLURM_CONF" -N "$n"; done
    # A wall-clock deadline, and sinfo bounded too: a slurmctld that accepts but does not
    # answer would otherwise hold each sinfo for its 10 s message timeout.
    local deadline=$((SECONDS + ${SLURM_START_TIMEOUT_S:-60}))
    while ((SECONDS < deadline)); do
        if [ "$(timeout 5 sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" -eq ${#NODES[@]} ]; then
            echo "SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.2
    done
    echo "slurm.sh: nodes did not become idle within ${SLURM_START_TIMEOUT_S:-60} s; logs in $d/log" >&2
    timeout 5 sinfo -N >&2 || true
    ps -eo pid,stat,etime,args | grep -E '[s]lurm' >&2 || true
    tail -n 20 "$d"/log/*.log >&2 || true
    stop "$d"
    return 1
}

stop() {
    local d=$1
    export SLURM_CONF=$d/slurm.conf
    [ -f "$SLURM_CONF" ] && timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    local f pid
    for f in "$d"/slurmctld.pid "$d"/slurmd-*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    done
    # drop exactly our line (tag + this directory)
    if grep -q "$HOSTS_TAG $d\$" /etc/hosts; then
        grep -v "$HOSTS_TAG $d\$" /etc/hosts >/etc/hosts.megalite.$$ || true
        cat /etc/hosts.megalite.$$ >/etc/hosts  # rewrite in place: /etc/hosts may be a mount
        rm -f /etc/hosts.megalite.$$
    fi
}

case "${1:-}" in
    install) install_packages ;;
    start) [ -n "${2:-}" ] || { echo "usage: $0 start DIR" >&2; exit 2; }; start "$(realpath "$2")" ;;
    stop) [ -n "${2:-}" ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop "$(realpath "$2")" ;;
    *) echo "usage: $0 {install|start DIR|stop DIR}" >&2; exit 2 ;;
esac
