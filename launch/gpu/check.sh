#!/usr/bin/env bash
# One GPU, one pass: parity with the official code (fp32 and bf16, the oracle's golden set in
# tests/fixtures), then the published shapes' training step and generation speed.
#
#   launch/gpu/check.sh [OUTDIR] [PART ...]
#   PART: env parity parity_diag train train_none train_cudnn generate tiny (default: the first six but parity_diag)
#
# Each part writes OUTDIR/PART.log and runs under its own time limit (CHECK_TIMEOUT seconds, default 300),
# so one hang or OOM costs that part only; the last lines summarise every part.
set -u
out=${1:-gpu_check}; shift || true
parts=${*:-env parity train train_none train_cudnn generate}
limit=${CHECK_TIMEOUT:-300}
mkdir -p "$out"
# The full-size step without remat needs ~97 GiB (the AOT table): let JAX take more than its default 75 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1
fx=tests/fixtures/oracle
summary=()

run_part() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$name rc=$rc $((SECONDS - t0))s :: $(grep -E '^(parity:|RESULT)' "$out/$name.log" | tail -1 | cut -c1-400)")
  tail -4 "$out/$name.log"
}

for p in $parts; do
  case $p in
    env) run_part env bash -c 'nvidia-smi; python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"' ;;
    parity)
      run_part parity_fp32 python3 -m cheers_jax.parity --checkpoint $fx/tiny_ckpt --golden $fx/golden.npz
      run_part parity_bf16 python3 -m cheers_jax.parity --checkpoint $fx/tiny_ckpt --golden $fx/golden_bf16.npz --dtype bfloat16 ;;
    parity_diag)  # which op leaves fp32 on a GPU: the LLM and heads groups under each suspect switched off
      run_part diag_default python3 -m cheers_jax.parity --checkpoint $fx/tiny_ckpt --golden $fx/golden.npz --groups heads,und
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" run_part diag_no_triton_gemm \
        python3 -m cheers_jax.parity --checkpoint $fx/tiny_ckpt --golden $fx/golden.npz --groups heads,und
      NVIDIA_TF32_OVERRIDE=0 run_part diag_no_tf32 \
        python3 -m cheers_jax.parity --checkpoint $fx/tiny_ckpt --golden $fx/golden.npz --groups heads,und ;;
    train) run_part train python3 -m cheers_jax.bench train --full-size --batch-sizes 8 --steps 8 ;;
    train_none) run_part train_none python3 -m cheers_jax.bench train --full-size --batch-sizes 8 --remat none --steps 8 ;;
    train_cudnn) run_part train_cudnn python3 -m cheers_jax.bench train --full-size --batch-sizes 8 --attention cudnn --steps 8 ;;
    generate) run_part generate python3 -m cheers_jax.bench generate --full-size --batch-sizes 1,8 --repeats 3 ;;
    tiny) run_part tiny python3 -m cheers_jax.train --config tiny --workdir "$out/tiny_run" ;;
    *) echo "unknown part $p"; exit 2 ;;
  esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
