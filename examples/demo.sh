#!/usr/bin/env bash
# The demo: a small GPU test suite run with `pytest -n auto` under pytest-gpushare.
# On a machine without an NVIDIA GPU it simulates a 24 GiB card with 2 GiB used by others,
# and keeps 12 GiB for Ollama (the case this project started from). With a GPU, it uses it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -e . 2> >(grep -v "is ignored: it is neither" >&2) >/dev/null

sim=()
if ! .venv/bin/python - <<'PY'
import sys
from pytest_gpushare.gpus.nvml import NvmlProbe
sys.exit(0 if NvmlProbe().probe().gpus else 1)
PY
then
  echo "demo: no NVIDIA GPU found here, simulating one: --gpushare-simulate=24GiB:used=2GiB"
  sim=(--gpushare-simulate=24GiB:used=2GiB)
fi

out="${TMPDIR:-/tmp}/gpushare-demo"
mkdir -p "$out"
set -x
.venv/bin/python -m pytest examples/basic examples/pytorch -n auto -p no:cacheprovider \
  --gpushare-ollama-reserve=12GiB --gpushare-safety=1GiB --gpushare-worker-mem=3GiB \
  --gpushare-report="$out/report.json" "${sim[@]}" "$@"
.venv/bin/gpushare timeline "$out/report.json" -o "$out/timeline.svg"
