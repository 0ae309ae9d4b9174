#!/usr/bin/env bash
# Check every GPU path of oatui on this machine: bash bench/gpu_check.sh [--only STEP ...] [--budget S]
# Results under $OUT (./gpu-check/ when unset); see bench/gpu_check.py and README.md.
set -u
cd "$(dirname "$0")/.." || exit 2
if [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=$(command -v python3 || command -v python) || { echo "gpu_check: no .venv/bin/python (run 'make setup')" >&2; exit 2; }
fi
exec "$python" bench/gpu_check.py "$@"
