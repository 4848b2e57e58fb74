#!/usr/bin/env bash
# Train the regime map's runs (issue: "the regime map"): tiny presets on the pydoc corpus, batch 16 x 128
# bytes, one thread each (about 3-5 min per run on this 2-core machine; run them one after another).
# Usage: bash scripts/regime_map_train.sh [RUNS_DIR] [NAME ...]    (default runs/regime, every run)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/regime}; shift || true
export HF_HUB_OFFLINE=1
common=(--size tiny --batch-size 16 --threads 1 --no-progress --warmup 50)
declare -A RUN=(
  [const-s12]="--arch gpt2 --optimizer adamw --lr 2e-3 --schedule constant --steps 600 --ckpt-every 12 --ckpt-from 420"
  [const-s48]="--arch gpt2 --optimizer adamw --lr 2e-3 --schedule constant --steps 1000 --ckpt-every 48 --ckpt-from 472"
  [const-s48-seed1]="--arch gpt2 --optimizer adamw --lr 2e-3 --schedule constant --steps 1000 --ckpt-every 48 --ckpt-from 472 --seed 1"
  [const-s96]="--arch gpt2 --optimizer adamw --lr 2e-3 --schedule constant --steps 1200 --ckpt-every 96 --ckpt-from 144"
  [wsd-s48]="--arch gpt2 --optimizer adamw --lr 2e-3 --schedule wsd --decay-fraction 0.5 --steps 1000 --ckpt-every 48 --ckpt-from 472"
  [cosine-s48]="--arch gpt2 --optimizer adamw --lr 2e-3 --schedule cosine --steps 1000 --ckpt-every 48 --ckpt-from 472"
  [muon-s48]="--arch gpt2 --optimizer muon --schedule constant --steps 1000 --ckpt-every 48 --ckpt-from 472"
  [llama-s48]="--arch llama --optimizer adamw --lr 2e-3 --schedule constant --steps 1000 --ckpt-every 48 --ckpt-from 472"
)
ORDER=(const-s48 wsd-s48 cosine-s48 const-s96 const-s12 muon-s48 llama-s48 const-s48-seed1)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [ -n "${RUN[$name]:-}" ] || { echo "regime_map_train.sh: unknown run $name (known: ${ORDER[*]})" >&2; exit 2; }
  if [ -f "$RUNS/$name/run.json" ] && grep -q '"status": "finished"' "$RUNS/$name/run.json"; then
    echo "$name: already trained"; continue
  fi
  rm -rf "$RUNS/$name"
  # shellcheck disable=SC2086
  python -m experiments.lm.train ${RUN[$name]} "${common[@]}" -o "$RUNS/$name"
  echo "$name: trained"
done
