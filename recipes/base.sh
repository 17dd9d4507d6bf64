#!/usr/bin/env bash
# Rebuilds recon_plugin/weights/unrolled-base.{safetensors,json}. Resumable: rerun after an
# interruption, every stage continues from its files in runs/base-transfer/.
# Stage 1 fills the batch pool (one process); stage 2 trains from it while it grows.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/base-transfer}
STEPS=${STEPS:-2400}
mkdir -p "$RUN"
# Stage 0: the CNN priors start from the previous base model (gradient data consistency,
# template-only training; its card says how it was made), taken from git history.
INIT="$RUN/init/unrolled-base-v2"
if [ ! -f "$INIT.safetensors" ]; then
  mkdir -p "$RUN/init"
  git show fff1f56:recon_plugin/weights/unrolled-base.safetensors >"$INIT.safetensors.tmp"
  git show fff1f56:recon_plugin/weights/unrolled-base.json >"$INIT.json"
  mv "$INIT.safetensors.tmp" "$INIT.safetensors"
fi
OMP_NUM_THREADS=1 recon-plugin train-pool "$RUN/pool" --batches "${POOL:-300}" --seed 0 \
    >>"$RUN/pool.log" 2>&1 &
POOL_PID=$!
trap 'kill $POOL_PID 2>/dev/null || true' EXIT
OMP_NUM_THREADS=${THREADS:-1} recon-plugin -v train --run-dir "$RUN/train" --pool-dir "$RUN/pool" \
    --dc prox --noise-aware --cg-iters 4 --freeze-bn --init "$INIT.safetensors" \
    --steps "$STEPS" --lr "${LR:-5e-4}" --time-budget "${BUDGET:-36000}" \
    --export "$RUN/unrolled-base" >>"$RUN/train.log" 2>&1
