#!/usr/bin/env bash
# The committed CPU reports of the LM study (results/lm/<arch>-<optimizer>/): tiny preset, pydoc corpus,
# constant lr after a 50-step warmup (AdamW 2e-3, as in the demo), 600 steps of batch 16 x 128 bytes, 16 checkpoints from step 420.
# Each run: ~2.5 min of training and ~3 min of study on 2 cores. Usage: bash scripts/lm_cpu_reports.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/lm_cpu}
export HF_HUB_OFFLINE=1
for arch in gpt2 llama; do
  for opt in adamw muon; do
    name=$arch-$opt
    lr=(); [ "$opt" = adamw ] && lr=(--lr 2e-3)  # Muon: the trainer's defaults (0.01 matrices, 0.003 AdamW rest)
    rm -rf "$RUNS/$name"
    python -m experiments.lm.train --arch "$arch" --size tiny --optimizer "$opt" --schedule constant "${lr[@]}" \
      --warmup 50 --steps 600 --batch-size 16 --ckpt-every 12 --ckpt-from 420 --threads 1 --no-progress \
      -o "$RUNS/$name"
    python -m experiments.lm.study --run "$RUNS/$name" -o "results/lm/$name" --force --threads 1 --quiet
    cp "$RUNS/$name/run.json" "$RUNS/$name/log.jsonl" "results/lm/$name/"
  done
done
