#!/bin/bash
# Cloud TPU pod slice: the same command on every worker (jax detects the pod by itself).
#   launch/tpu/train.sh TPU_NAME ZONE CONFIG WORKDIR(gs://...) [overrides...]
# Assumes the repository is checked out at ~/cheers-jax on every worker and its requirements are installed
# (run launch/tpu/setup.sh once).
set -euo pipefail
TPU=${1:?usage: train.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir (gs://bucket/run)}
shift 4
gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" --worker=all --command \
  "cd ~/cheers-jax && python3 -m cheers_jax.train --config ${CONFIG} --workdir ${WORKDIR} $*"
