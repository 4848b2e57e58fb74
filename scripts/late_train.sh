#!/usr/bin/env bash
# Train the late-stage runs (issue: "Late-stage evidence, pre-registered"): the tiny preset on gcide,
# 24 000 steps x 32 x 128 bytes = 98 M tokens (117 tokens per parameter of GPT-2 tiny's 0.84 M; 2.7 passes
# over gcide's 36 M training tokens). Schedule WSD: warmup 1 200 steps, constant lr until step 19 200 (80%),
# then a linear decay to 0 over the last 20%; the constant phase is the same run as a constant-lr run up to
# step 19 200. Checkpoints every 100 steps from step 7 200 to the end: the constant phase then holds 16
# checkpoints at spacing 800 (the widest of the dose-response), and the last 25% of it every 100 steps;
# validation and resume state at every checkpoint and every 500 steps besides (a killed session loses
# < 500 steps).
#
# Usage: bash scripts/late_train.sh [RUNS_DIR] [NAME ...]   (default ../runs/late, every run; --threads
# from $THREADS, default 2). Run it again to continue: an unfinished run resumes where it was saved.
# Keep RUNS_DIR outside the repository; commit only results.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-../runs/late}; shift || true
THREADS=${THREADS:-2}
export HF_HUB_OFFLINE=1
common=(--corpus gcide --size tiny --schedule wsd --decay-fraction 0.2 --steps 24000 --warmup 1200
        --ckpt-every 100 --ckpt-from 7200 --eval-every 500 --save-every 500 --no-progress)
declare -A RUN=(
  [gpt2-adamw-s0]="--arch gpt2 --optimizer adamw --seed 0"
  [gpt2-adamw-s1]="--arch gpt2 --optimizer adamw --seed 1"
  [gpt2-adamw-s2]="--arch gpt2 --optimizer adamw --seed 2"
  [llama-muon-s0]="--arch llama --optimizer muon --seed 0"
)
ORDER=(gpt2-adamw-s0 llama-muon-s0 gpt2-adamw-s1 gpt2-adamw-s2)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [ -n "${RUN[$name]:-}" ] || { echo "late_train.sh: unknown run $name (known: ${ORDER[*]})" >&2; exit 2; }
  out="$RUNS/$name"
  if [ -f "$out/run.json" ] && grep -q '"status": "finished"' "$out/run.json"; then
    echo "$name: already trained"; continue
  fi
  resume=(); [ -f "$out/resume/optimizer.pt" ] && resume=(--resume)
  # shellcheck disable=SC2086
  python -m experiments.lm.train ${RUN[$name]} "${common[@]}" --threads "$THREADS" "${resume[@]}" -o "$out"
  echo "$name: trained"
done
