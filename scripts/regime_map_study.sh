#!/usr/bin/env bash
# Study each trained run of the regime map (scripts/regime_map_train.sh): `extramerge study` on its
# checkpoints, calibration half = the run's val split, measurement half = its test split, the learning rate
# from its log; then a --quick study of the same run (its recommendation and its time). Results go to results/regime/<run>/.
# Usage: bash scripts/regime_map_study.sh [RUNS_DIR] [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/regime}; shift || true
export HF_HUB_OFFLINE=1
ORDER=(const-s12 const-s48 const-s48-seed1 const-s96 wsd-s48 cosine-s48 muon-s48 llama-s48)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  run="$RUNS/$name"
  grep -q '"status": "finished"' "$run/run.json" 2>/dev/null || { echo "$name: not trained yet" >&2; continue; }
  # the study writes into the run folder (its own output, replaced with --force); the results are copied
  python -m extramerge study "$run" --calib "$run/data/val.jsonl" --test "$run/data/test.jsonl" \
    --threads 1 --quiet --force -o "$run/study"
  mkdir -p "results/regime/$name"
  cp "$run/study/study.json" "$run/study/study.md" "$run/study/alpha.png" "results/regime/$name/"
  if [ -z "${NO_QUICK:-}" ]; then  # --quick too: its recommendation and its time
    python -m extramerge study "$run" --calib "$run/data/val.jsonl" --test "$run/data/test.jsonl" \
      --threads 1 --quiet --force --quick -o "$run/study-quick"
    cp "$run/study-quick/study.json" "results/regime/$name/study-quick.json"
  fi
  cp "$run/run.json" "results/regime/$name/run.json"
done
