#!/usr/bin/env bash
# Start N peers on this machine: bash launch/local.sh [NPROC] [hydra overrides...]
#   bash launch/local.sh 2 algo=ppo env=cartpole
# The rendezvous and gloo stay on loopback; torchrun restarts all peers (resuming from the last
# checkpoint) up to MAX_RESTARTS times if one dies. Trusted networks only: torchrun's rendezvous
# store listens on all interfaces, without authentication, even with this loopback endpoint.
set -euo pipefail
nproc=${1:-2}
[ $# -gt 0 ] && shift
port=${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec torchrun --nnodes=1 --nproc_per_node="$nproc" --max-restarts="${MAX_RESTARTS:-0}" \
  --rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$port" --rdzv-id="${RUN_ID:-p2prl-$$}" \
  -m p2prl.train "$@"
