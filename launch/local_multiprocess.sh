#!/usr/bin/env bash
# NPROC processes of one command on this machine, each with DEVICES fake CPU devices, joined by
# jax.distributed (ovjax/distributed.py reads the OVJAX_* variables; CPU collectives via gloo). Each process
# plays one host (OVJAX_HOST_NAME=local<i>), so the mesh puts `data` across processes as on a cluster.
#
#   launch/local_multiprocess.sh NPROC DEVICES -- CMD...
#   launch/local_multiprocess.sh 2 4 -- python -m ovjax train --config configs/stage2.py:tiny --workdir DIR ...
#
# Output lines are prefixed with [i]. Exit status: the first non-zero exit status of any process (the others
# are then stopped), else 0.
set -u
usage() { echo "usage: $0 NPROC DEVICES -- CMD..." >&2; exit 2; }
[ $# -ge 4 ] && [ "$3" = "--" ] || usage
NPROC=$1; DEVICES=$2; shift 3
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "$0: NPROC=$NPROC is not a positive integer" >&2; exit 2; }
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || { echo "$0: DEVICES=$DEVICES is not a positive integer" >&2; exit 2; }

PY=${PYTHON:-python3}
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
export OVJAX_COORDINATOR="localhost:$PORT" OVJAX_NUM_PROCESSES="$NPROC" JAX_PLATFORMS=cpu
# the caller's other XLA flags stay; its device count (e.g. from a test's environment) gives way to DEVICES
OTHER_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES $OTHER_FLAGS"

declare -a PIDS=()
declare -A INDEX=()
stop_all() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < NPROC; i++)); do
  ( export OVJAX_PROCESS_ID=$i OVJAX_HOST_NAME="local$i"
    exec > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2)
    exec "$@" ) &
  PIDS+=($!); INDEX[$!]=$i
done

status=0
remaining=$NPROC
while [ "$remaining" -gt 0 ]; do
  wait -n -p done_pid; rc=$?
  [ -z "${done_pid:-}" ] && break
  remaining=$((remaining - 1))
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "local_multiprocess: process ${INDEX[$done_pid]} (pid $done_pid) exited with status $rc; stopping the others" >&2
    stop_all
  fi
  unset done_pid
done
wait
exit "$status"
