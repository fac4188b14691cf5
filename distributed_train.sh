#!/usr/bin/env bash
# Launch train.py on NPROC processes per node with torchrun (DDP: NCCL on GPUs, gloo on CPU).
#
#   ./distributed_train.sh NPROC [--nnodes N] [--node-rank R] [--master-addr HOST] [--master-port PORT] [train.py args]
#
# Single node (default): a free rendezvous port is picked automatically (torchrun --standalone) unless
# MASTER_PORT/--master-port is given. Multi-node: run the same command on every node with its own node rank, e.g.
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 ./distributed_train.sh 8 /data/imagenet ...
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 ./distributed_train.sh 8 /data/imagenet ...
# The flags --nnodes/--node-rank/--master-addr/--master-port (anywhere in the arguments) override the env vars.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
    echo "$0: NPROC (processes per node) must be an integer >= 1, got '${1:-}'" >&2
    echo "usage: $0 NPROC [--nnodes N] [--node-rank R] [--master-addr HOST] [--master-port PORT] [train.py args...]" >&2
    exit 2
fi
need_value() {  # an option that takes a value was given without one
    if [[ $# -lt 2 || "$2" == --* ]]; then
        echo "$0: $1 needs a value (e.g. $1 2)" >&2
        exit 2
    fi
}
NPROC=$1
shift

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-}
PYTHON=${PYTHON:-python}

TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes) need_value "$@"; NNODES=$2; shift 2 ;;
        --nnodes=*) NNODES=${1#*=}; shift ;;
        --node-rank|--node_rank) need_value "$@"; NODE_RANK=$2; shift 2 ;;
        --node-rank=*|--node_rank=*) NODE_RANK=${1#*=}; shift ;;
        --master-addr|--master_addr) need_value "$@"; MASTER_ADDR=$2; shift 2 ;;
        --master-addr=*|--master_addr=*) MASTER_ADDR=${1#*=}; shift ;;
        --master-port|--master_port) need_value "$@"; MASTER_PORT=$2; shift 2 ;;
        --master-port=*|--master_port=*) MASTER_PORT=${1#*=}; shift ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# torchrun would set 1 thread per process anyway; on a CPU-only run spread the cores over the processes
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    CORES=$(nproc 2>/dev/null || echo "$NPROC")
    export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi

if [[ "$NNODES" == "1" && -z "$MASTER_PORT" ]]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
fi

exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC" "$HERE/train.py" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
