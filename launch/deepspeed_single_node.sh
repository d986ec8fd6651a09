#!/usr/bin/env bash
# One node, N ranks, through the DeepSpeed launcher.
#   bash launch/deepspeed_single_node.sh N configs/NAME.yaml [KEY=VALUE ...]
# GPU: N = GPUs (nccl, one rank per GPU). CPU: N = ranks (gloo); --num_gpus is the rank count there,
# and each rank gets OMP_NUM_THREADS = cores / N threads unless you set it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${1:?usage: deepspeed_single_node.sh N CONFIG [KEY=VALUE ...]}"
CONFIG="${2:?usage: deepspeed_single_node.sh N CONFIG [KEY=VALUE ...]}"
shift 2
CORES="$(nproc)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / N > 0 ? CORES / N : 1 ))}"
PORT="${MASTER_PORT:-$("$ROOT/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
# Not exec: DeepSpeed's single-node runner does not pass a SIGTERM on (a 'kill' of the launcher left
# deepspeed.launcher.launch and the ranks training on, orphaned, holding the output folder's lock). The
# runner gets its own process group, and a TERM/INT/HUP to this script goes to that whole group (an INT
# as INT, as Ctrl-C reached every rank before).
setsid "$ROOT/.venv/bin/deepspeed" --num_gpus "$N" --master_port "$PORT" --no_local_rank \
    --module rest_ds train --config "$CONFIG" "$@" &
PID=$!
# A SIGKILL of this script cannot be trapped, and the job, in its own group, trained on unseen (holding
# the lock, so a resume was refused). A watchdog outside the trap ends the group once this script is
# gone; it exits with the job and keeps no output pipe open.
SELF=$$
( trap '' INT; while kill -0 "$PID" 2>/dev/null; do
      if ! kill -0 "$SELF" 2>/dev/null; then kill -TERM -- "-$PID" 2>/dev/null; break; fi
      sleep 1
  done ) </dev/null >/dev/null 2>&1 &
trap 'kill -TERM -- "-$PID" 2>/dev/null' TERM HUP
trap 'kill -INT -- "-$PID" 2>/dev/null' INT
set +e
wait "$PID"
RC=$?
while kill -0 "$PID" 2>/dev/null; do  # a trapped signal ends 'wait' early: wait for the group to stop
    wait "$PID"
    RC=$?
done
exit "$RC"
