#!/usr/bin/env bash
# One torchrun per node, all meeting at a c10d rendezvous on the head node:
#   NNODES=2 HEAD_ADDR=10.0.0.1 IFNAME=eth1 bash launch/multinode.sh algo=ppo env=lunarlander   (on every node)
#
# Environment (the same on every node, but for NODE_RANK and IFNAME where interfaces differ):
#   NNODES          number of nodes, or MIN:MAX for elastic membership (required)
#   HEAD_ADDR       address of the node that hosts the rendezvous; it must stay up for the whole job (required)
#   PORT            rendezvous port on HEAD_ADDR (default 29500)
#   RUN_ID          rendezvous id, also the run dir's name; the same on every node (default p2prl)
#   NODE_RANK       optional: 0 marks the rendezvous host; without it the node whose address HEAD_ADDR is (or
#                   resolves to) hosts, and where that cannot be told, torchrun's own guess decides.
#                   torchrun's c10d rendezvous assigns the nodes' ranks itself: RANK 0 may live on another node.
#   IFNAME          network interface the peers use (gloo and NCCL); its IPv4 address becomes this node's
#                   address. Interface names differ between clusters: check `ip -4 addr`.
#   LOCAL_ADDR      this node's address, if IFNAME does not say it (default: the first of `hostname -I`).
#                   Needed because nodes may share a hostname that resolves elsewhere (then workers would dial
#                   the wrong address for the store).
#   NPROC_PER_NODE  peers on this node (default 1; one per GPU on GPU nodes)
#   MAX_RESTARTS    torchrun restarts of all peers after a failure or a membership change (default 0; elastic: > 0)
#   RDZV_CONF       extra --rdzv-conf entries, e.g. join_timeout=600,last_call_timeout=30
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE
#                   1 (the default for elastic NNODES=MIN:MAX or MAX_RESTARTS > 0): each rendezvous round gets a
#                   fresh store, hosted by that round's RANK 0. torchrun's shared store cannot admit a node that
#                   joins a running job (it waits forever for the new round's MASTER_ADDR), keeps keys of
#                   earlier rounds, and tells rounds apart by restart counts that the agents of different
#                   nodes may count differently (a peer that failed counts, a membership change does not).
#   TORCHRUN        the torchrun command (default torchrun)
#   MODULE          the Python module every peer runs (default p2prl.train); e.g. p2prl.bench.syncbench, the
#                   sync microbenchmark `python -m p2prl.bench --network` starts on its hosts this same way
# Everything after the environment is passed to MODULE: Hydra overrides for p2prl.train, its own arguments
# for another module.
# Trusted networks only: torchrun's rendezvous store listens on all interfaces without authentication.
set -euo pipefail
: "${NNODES:?set NNODES (a number, or MIN:MAX)}"
: "${HEAD_ADDR:?set HEAD_ADDR (the address of the rendezvous host)}"
PORT=${PORT:-29500}
RUN_ID=${RUN_ID:-p2prl}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
if [ -n "${IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME="$IFNAME" NCCL_SOCKET_IFNAME="$IFNAME"
  if [ -z "${LOCAL_ADDR:-}" ]; then
    LOCAL_ADDR=$(ip -4 -o addr show dev "$IFNAME" | awk '{split($4, a, "/"); print a[1]; exit}')
  fi
fi
if [ -z "${LOCAL_ADDR:-}" ]; then
  LOCAL_ADDR=$(hostname -I | awk '{print $1}')
fi
: "${LOCAL_ADDR:?cannot tell the address of this node: set IFNAME or LOCAL_ADDR}"
# The addresses a name (or an address) stands for, sorted, one a line; none if it does not resolve.
resolve() {
  if command -v getent >/dev/null; then
    getent ahosts "$1" | awk '{print $1}'
  else
    "${PYTHON:-python3}" -c 'import socket, sys; print(*{a[4][0] for a in socket.getaddrinfo(sys.argv[1], None)}, sep="\n")' "$1"
  fi 2>/dev/null | sort -u
}
# torchrun guesses whether it hosts the rendezvous by comparing HEAD_ADDR with this host's names; an
# address on a secondary interface defeats the guess, so say it where it is known: NODE_RANK, or
# HEAD_ADDR resolving to this node's address. Nowhere else: is_host=0 is obeyed, and HEAD_ADDR given as
# a name (or localhost) differs from every node's address as a string, so no node would host. Then
# torchrun decides. So it does for a loopback head too: it hosts, or joins when another agent on this
# machine holds the port, which an explicit is_host=1 on several loopback "nodes" would not.
is_host=
if [ -n "${NODE_RANK:-}" ]; then
  is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)
else
  common=$(comm -12 <(resolve "$HEAD_ADDR") <(resolve "$LOCAL_ADDR") | head -n 1)
  if [ -n "$common" ] && [[ "$common" != 127.* && "$common" != ::1 ]]; then
    is_host=1
  fi
fi
conf=${RDZV_CONF:-}
if [ -n "$is_host" ]; then
  conf="is_host=$is_host${conf:+,$conf}"
fi
if [[ "$NNODES" == *:* || "${MAX_RESTARTS:-0}" != 0 ]]; then
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
exec ${TORCHRUN:-torchrun} --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --max-restarts="${MAX_RESTARTS:-0}" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$PORT" --rdzv-id="$RUN_ID" ${conf:+--rdzv-conf="$conf"} \
  --local-addr="$LOCAL_ADDR" -m "${MODULE:-p2prl.train}" "$@"
