#!/bin/bash
# Plain multi-node launch (no scheduler): run on every node with its own CHEERS_PROCESS_ID.
#   CHEERS_COORDINATOR=node0:12345 CHEERS_NUM_PROCESSES=2 CHEERS_PROCESS_ID=0 launch/multinode/train.sh CONFIG WORKDIR
# One process per node drives all its local GPUs (set CHEERS_LOCAL_DEVICE_IDS to split a node into
# several processes instead).
set -euo pipefail
: "${CHEERS_COORDINATOR:?set CHEERS_COORDINATOR=host:port of process 0}"
: "${CHEERS_NUM_PROCESSES:?set CHEERS_NUM_PROCESSES}"
: "${CHEERS_PROCESS_ID:?set CHEERS_PROCESS_ID (0..N-1)}"
CONFIG=${1:?usage: train.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: train.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/../.."
exec python -m cheers_jax.train --config "${CONFIG}" --workdir "${WORKDIR}" "$@"
