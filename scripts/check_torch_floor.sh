#!/usr/bin/env bash
# Run the test suite against the lowest torch (and, with TRANSFORMERS=..., transformers) that
# pyproject.toml claims: torch>=2.9 (torch.optim.Muon), transformers>=4.56 (the `dtype=` keyword; merges then
# load through eval.load_weights' 4.x path: tests/extramerge/{eval,study,lm} green on 4.56.2, and its own tests,
# study/test_families.py and test_stream.py, on 4.57.6).
#   [TRANSFORMERS=4.56.2] bash scripts/check_torch_floor.sh [TORCH_VERSION] [pytest args...]
# CI tests the pinned torch of constraints.txt; this checks the floor of the range, in its own venv (PyPI's
# build for that version: about 3 GB with its CUDA libraries, run on the CPU). It never touches the
# project's own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${1:-2.9.1}"
shift || true
VENV="${VENV:-/tmp/venv-torch-$TORCH}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# the project with its test extra, torch (and transformers) held at the versions asked for
pins=("torch==$TORCH")
[ -n "${TRANSFORMERS:-}" ] && pins+=("transformers==$TRANSFORMERS")
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" -e ".[test]"
"$VENV/bin/python" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
