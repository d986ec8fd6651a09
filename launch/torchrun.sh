#!/usr/bin/env bash
# torchrun: one node, or several with NNODES / NODE_RANK / MASTER_ADDR (run it on every node).
#   bash launch/torchrun.sh N configs/NAME.yaml [KEY=VALUE ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 bash launch/torchrun.sh 4 configs/NAME.yaml   # on node01
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node01 bash launch/torchrun.sh 4 configs/NAME.yaml   # on node02
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${1:?usage: torchrun.sh RANKS_PER_NODE CONFIG [KEY=VALUE ...]}"
CONFIG="${2:?usage: torchrun.sh RANKS_PER_NODE CONFIG [KEY=VALUE ...]}"
shift 2
CORES="$(nproc)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / N > 0 ? CORES / N : 1 ))}"
if [ -z "${MASTER_PORT:-}" ] && [ "${NNODES:-1}" = 1 ]; then
    # one node: a free port (a second run on the node failed on a fixed 29500 with EADDRINUSE);
    # several nodes must agree on the port: give MASTER_PORT (default 29500)
    MASTER_PORT="$("$ROOT/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
exec "$ROOT/.venv/bin/torchrun" --nproc_per_node "$N" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m rest_ds train --config "$CONFIG" "$@"
