#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher and a hostfile (see hostfile.example).
#   bash launch/deepspeed_multi_node.sh launch/hostfile configs/NAME.yaml [KEY=VALUE ...]
#       from the first node: DeepSpeed starts every node's ranks over ssh (pdsh).
#   NODE_RANK=i bash launch/deepspeed_multi_node.sh launch/hostfile configs/NAME.yaml [...]
#       on every node i = 0, 1, ... (its line in the hostfile): no ssh (deepspeed --no_ssh),
#       e.g. from a batch system that starts one copy per node. Set MASTER_ADDR to an address
#       of the first node that the others can reach if its hostfile name is not one.
# Needs (ssh mode): passwordless ssh from this node to every host in the hostfile. Always: the
# same checkout and virtual environment at the same path on every node, and the output folder
# (output_dir) and the scene files on a file system all nodes share (checkpoints are written by
# every rank).
# Threads: DeepSpeed forwards only some variables to remote nodes, so this script does not rely
# on OMP_NUM_THREADS there: each rank sets its own thread count at start-up (train.threads, else
# OMP_NUM_THREADS where set, else the cores it may use / the ranks on its node).
# Ranks r with the same r // sp share one scene: keep mesh.sp a divisor of the slots per node,
# so the halo exchange of a scene stays inside one node (rest-ds warns otherwise).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE="${1:?usage: deepspeed_multi_node.sh HOSTFILE CONFIG [KEY=VALUE ...]}"
CONFIG="${2:?usage: deepspeed_multi_node.sh HOSTFILE CONFIG [KEY=VALUE ...]}"
shift 2
# the first host line: comment and blank lines do not count (hostfile.example starts with comments)
FIRST="$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")"
[ -n "$FIRST" ] || { echo "error: $HOSTFILE names no host (lines '<host> slots=<n>')" >&2; exit 2; }
MASTER="${MASTER_ADDR:-$FIRST}"
NOSSH=()
if [ -n "${NODE_RANK:-}" ]; then
    NOSSH=(--no_ssh --node_rank "$NODE_RANK")
fi
exec "$ROOT/.venv/bin/deepspeed" --hostfile "$HOSTFILE" "${NOSSH[@]}" --master_addr "$MASTER" \
    --master_port "${MASTER_PORT:-29500}" --no_local_rank --module rest_ds train --config "$CONFIG" "$@"
