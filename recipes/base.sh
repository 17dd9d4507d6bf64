#!/usr/bin/env bash
# Rebuilds recon_plugin/weights/unrolled-base.{safetensors,json}. Resumable: rerun after an
# interruption; every stage continues from its files in runs/base-transfer/.
#   stage 0: the CNN priors start from the previous base model (gradient data consistency,
#            template-only training; its card says how it was made), taken from git history;
#   stage 1: draw POOL transfer batches (recon_plugin/training/transfer.py) into the pool;
#   stage 2: train the noise-aware MoDL network on them (cosine schedule over STEPS = 1500,
#            stopped at STOP_AT = 1200 steps, where the shipped run stopped for time).
# The shipped run drew its pool while training (the pool stopped at 224 batches at step ~200
# to free the CPU); this recipe draws the same 224 batches first, then trains.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/base-transfer}
STEPS=${STEPS:-1500}
POOL=${POOL:-224}
mkdir -p "$RUN"
INIT="$RUN/init/unrolled-base-v2"
if [ ! -f "$INIT.safetensors" ]; then
  mkdir -p "$RUN/init"
  git show fff1f56:recon_plugin/weights/unrolled-base.safetensors >"$INIT.safetensors.tmp"
  git show fff1f56:recon_plugin/weights/unrolled-base.json >"$INIT.json"
  mv "$INIT.safetensors.tmp" "$INIT.safetensors"
fi
OMP_NUM_THREADS=${THREADS:-1} recon-plugin train-pool "$RUN/pool" --batches "$POOL" --seed 0 \
    >>"$RUN/pool.log" 2>&1
OMP_NUM_THREADS=${THREADS:-1} recon-plugin -v train --run-dir "$RUN/train" --pool-dir "$RUN/pool" \
    --dc prox --noise-aware --cg-iters 4 --freeze-bn --init "$INIT.safetensors" \
    --steps "$STEPS" --lr "${LR:-5e-4}" --stop-at "${STOP_AT:-1200}" \
    --export "$RUN/unrolled-base" >>"$RUN/train.log" 2>&1
cp "$RUN/unrolled-base.safetensors" "$RUN/unrolled-base.json" recon_plugin/weights/
