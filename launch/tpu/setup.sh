#!/bin/bash
# Once per TPU slice: copy the repository to every worker and install its requirements (+ jax[tpu]).
#   launch/tpu/setup.sh TPU_NAME ZONE
set -euo pipefail
TPU=${1:?usage: setup.sh TPU_NAME ZONE}
ZONE=${2:?zone}
cd "$(dirname "$0")/../.."
gcloud compute tpus tpu-vm scp --recurse . "${TPU}":~/cheers-jax --zone "${ZONE}" --worker=all
gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" --worker=all --command \
  "cd ~/cheers-jax && pip install -r requirements.txt 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
