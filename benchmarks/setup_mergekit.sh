#!/usr/bin/env bash
# Create an isolated venv with mergekit (from PyPI) for benchmarks/bench_merge.py.
#
#   bash benchmarks/setup_mergekit.sh            # -> .bench/mergekit-venv/bin/mergekit-yaml
#   MERGEKIT_VERSION=0.1.5 bash benchmarks/setup_mergekit.sh
#
# Idempotent: does nothing if the venv already has a working mergekit-yaml.
# torch is pinned through constraints.txt so pip takes the local CPU wheel (2.13.0)
# instead of downloading gigabytes of CUDA packages.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MERGEKIT_VENV:-$ROOT/.bench/mergekit-venv}"
VERSION="${MERGEKIT_VERSION:-0.1.5}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/mergekit-yaml" ] && "$VENV/bin/mergekit-yaml" --help >/dev/null 2>&1; then
    echo "mergekit already installed in $VENV ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"))'))"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# (grep drops the noise of this machine's pip config pointing at absent local index folders)
"$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" "mergekit==$VERSION" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }

"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "installed mergekit $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"))')" \
     "with torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') in $VENV"
