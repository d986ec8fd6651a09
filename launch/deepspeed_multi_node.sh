#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher and a hostfile (see hostfile.example).
#   bash launch/deepspeed_multi_node.sh launch/hostfile configs/NAME.yaml [KEY=VALUE ...]
# Needs: passwordless ssh from this node to every host in the hostfile, the same checkout and
# virtual environment at the same path on every node, and the output folder (output_dir) and
# the scene files on a file system all nodes share (checkpoints are written by every rank).
# Ranks r with the same r // sp share one scene: keep mesh.sp <= slots per node when you can,
# so the halo exchange of a scene stays inside one node.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE="${1:?usage: deepspeed_multi_node.sh HOSTFILE CONFIG [KEY=VALUE ...]}"
CONFIG="${2:?usage: deepspeed_multi_node.sh HOSTFILE CONFIG [KEY=VALUE ...]}"
shift 2
MASTER="${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}"
exec "$ROOT/.venv/bin/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module rest_ds train --config "$CONFIG" "$@"
