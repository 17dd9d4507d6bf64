#!/usr/bin/env bash
# Rebuilds pruned variants of the shipped unrolled-base (run recipes/base.sh first; its batch
# pool is reused) and copies them into recon_plugin/weights/. Resumable: each run continues
# from its checkpoints in runs/<method>-<ratio>/. The shipped ones:
#   VARIANTS="lean:0.5 lean:0.8" STEPS=200 recipes/variants.sh
# SPADE for comparison (not shipped): VARIANTS="spade:0.5 spade:0.75" SHIP=0 recipes/variants.sh
set -euo pipefail
cd "$(dirname "$0")/.."
POOL=${POOL:-runs/base-transfer/pool}
STEPS=${STEPS:-200}
VARIANTS=${VARIANTS:-lean:0.5 lean:0.8}
for V in $VARIANTS; do
  M=${V%%:*}; R=${V##*:}
  RUN=runs/$M-$R
  mkdir -p "$RUN"
  OMP_NUM_THREADS=${THREADS:-1} recon-plugin prune --model unrolled-base --method "$M" \
      --ratio "$R" --finetune teacher --steps "$STEPS" --lr "${LR:-1e-3}" --pool "$POOL" \
      --time-budget "${BUDGET:-36000}" --run-dir "$RUN" --export "$RUN/unrolled-$M-$R" \
      >>"$RUN/prune.log" 2>&1 &
done
wait
if [ "${SHIP:-1}" = 1 ]; then
  for V in $VARIANTS; do
    M=${V%%:*}; R=${V##*:}
    cp "runs/$M-$R/unrolled-$M-$R.safetensors" "runs/$M-$R/unrolled-$M-$R.json" \
       recon_plugin/weights/
  done
fi
