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

die() { echo "error: $*" >&2; exit 2; }
if [[ $# -lt 1 ]]; then
    die "NPROC missing: usage $0 NPROC [--nnodes N] [--node-rank R] [--master-addr HOST] [--master-port PORT] [train.py args...]"
fi
if [[ ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
    die "NPROC (processes per node) must be an integer >= 1, got '$1'"
fi
NPROC=$1
shift

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-}
PYTHON=${PYTHON:-python}

# value of a launcher flag: the next argument, which must exist and not be another option
need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (e.g. $1 $3)"; }
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes|--node-rank|--node_rank|--master-port|--master_port) need "$1" "${2:-}" 2 ;;&
        --master-addr|--master_addr) need "$1" "${2:-}" 10.0.0.1 ;;&
        --nnodes) NNODES=$2; shift 2 ;;
        --nnodes=*) NNODES=${1#*=}; shift ;;
        --node-rank|--node_rank) NODE_RANK=$2; shift 2 ;;
        --node-rank=*|--node_rank=*) NODE_RANK=${1#*=}; shift ;;
        --master-addr|--master_addr) MASTER_ADDR=$2; shift 2 ;;
        --master-addr=*|--master_addr=*) MASTER_ADDR=${1#*=}; shift ;;
        --master-port|--master_port) MASTER_PORT=$2; shift 2 ;;
        --master-port=*|--master_port=*) MASTER_PORT=${1#*=}; shift ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done

for spec in "NNODES --nnodes $NNODES 1" "NODE_RANK --node-rank $NODE_RANK 0" "MASTER_PORT --master-port ${MASTER_PORT:-1} 1"; do
    read -r name flag value lo <<< "$spec"
    [[ "$value" =~ ^[0-9]+$ && "$value" -ge "$lo" ]] || die "$name ($flag) must be an integer >= $lo, got '$value'"
done
(( NODE_RANK < NNODES )) || die "NODE_RANK (--node-rank) must be < NNODES ($NNODES), got $NODE_RANK"

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

# on SIGTERM/SIGINT torchrun forwards the signal and gives the workers this long to save before it kills them
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
# torchrun through training/launch.py: a SIGTERM/SIGINT stops with one line and exit 128+signal (no traceback)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m training.launch "${RDZV[@]}" --nproc_per_node "$NPROC" "$HERE/train.py" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
