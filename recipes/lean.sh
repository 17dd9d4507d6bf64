#!/usr/bin/env bash
# Rebuilds the shipped LEAN variants recon_plugin/weights/unrolled-lean-{0.5,0.8} from the shipped
# unrolled-base (run recipes/base.sh first; its batch pool is reused). Resumable: each run
# continues from its checkpoints in runs/lean-*/.
#   RATIOS="0.5 0.8" STEPS=300 recipes/lean.sh
set -euo pipefail
cd "$(dirname "$0")/.."
POOL=${POOL:-runs/base-transfer/pool}
STEPS=${STEPS:-300}
for R in ${RATIOS:-0.5 0.8}; do
  RUN=runs/lean-$R
  mkdir -p "$RUN"
  OMP_NUM_THREADS=${THREADS:-1} recon-plugin prune --model unrolled-base --method lean --ratio "$R" \
      --finetune teacher --steps "$STEPS" --lr "${LR:-1e-3}" --pool "$POOL" \
      --time-budget "${BUDGET:-36000}" --run-dir "$RUN" --export "$RUN/unrolled-lean-$R" \
      >>"$RUN/prune.log" 2>&1 &
done
wait
for R in ${RATIOS:-0.5 0.8}; do
  cp "runs/lean-$R/unrolled-lean-$R.safetensors" "runs/lean-$R/unrolled-lean-$R.json" \
     recon_plugin/weights/
done
