#!/usr/bin/env bash
# Rebuilds recon_plugin/weights/unrolled-base.{safetensors,json}. Resumable: rerun after an
# interruption; every stage continues from its files in runs/base-transfer/ and is skipped once
# its output exists.
#   stage 0: the CNN priors start from the previous base model (gradient data consistency,
#            template-only training; its card says how it was made), taken from git history;
#   stage 1: draw POOL transfer batches (recon_plugin/training/transfer.py, seed 0);
#   stage 2: train the noise-aware MoDL network on them (cosine schedule over STEPS = 1500,
#            stopped at STOP_AT = 1200 steps); its export is the shipped base (sha256
#            6da4d82d80ad).
# The shipped base was made with the code of its card's time. Later numerical changes (ESPIRiT's
# top eigenvectors by power iteration on a 96 grid: maps within 1e-3, reconstructions within
# 0.02 dB; A^H A on per-column virtual coils: images within 4e-6) change the pool's maps and the
# training arithmetic slightly: a rerun makes a model by the same recipe, not the same bytes.
# A stage-3 continuation (400 more steps on 120 fresh batches, seed 1) was tried and not shipped:
# docs/BENCHMARKS.md, "Models".
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/base-transfer}
STEPS=${STEPS:-1500}
POOL=${POOL:-224}
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$RUN"
STAGE2="$RUN/stage2/unrolled-base"
if [ ! -f "$STAGE2.safetensors" ]; then
  INIT="$RUN/init/unrolled-base-v2"
  if [ ! -f "$INIT.safetensors" ]; then
    mkdir -p "$RUN/init"
    git show fff1f56:recon_plugin/weights/unrolled-base.safetensors >"$INIT.safetensors.tmp"
    git show fff1f56:recon_plugin/weights/unrolled-base.json >"$INIT.json"
    mv "$INIT.safetensors.tmp" "$INIT.safetensors"
  fi
  recon-plugin train-pool "$RUN/pool" --batches "$POOL" --seed 0 >>"$RUN/pool.log" 2>&1
  recon-plugin -v train --run-dir "$RUN/train" --pool-dir "$RUN/pool" \
      --dc prox --noise-aware --cg-iters 4 --freeze-bn --init "$INIT.safetensors" \
      --steps "$STEPS" --lr "${LR:-5e-4}" --stop-at "${STOP_AT:-1200}" \
      --export "$STAGE2" >>"$RUN/train.log" 2>&1
fi
cp "$STAGE2.safetensors" "$STAGE2.json" recon_plugin/weights/
