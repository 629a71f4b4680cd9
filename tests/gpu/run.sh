#!/usr/bin/env bash
# The real-GPU check kit in one command (docs/howto/real-gpu-check.rst):
#
#   bash tests/gpu/run.sh [OUT]
#
# Installs this checkout (pip install --no-deps -e ., unless it is installed from here already),
# runs tests/gpu, and leaves its record in OUT (else $OUT, else /tmp/gpushare-gpu-kit):
# record.txt (the compact record), kit-log.txt (the kit's pytest output), runs.txt (every command
# it ran, with its output), nvidia-smi.txt, reports.json (each run's --gpushare-report) and
# timeline.svg: six files, as the device machine sends back at most eight.
#
# Exit code: 0 when every check passed, and also on a box without a GPU (or without torch that
# can use one), where every check is skipped and record.txt starts "result: skipped: no GPU ...";
# 1 when a check failed, or the kit could not run or ran past its time (under 5 minutes in all).
# PYTHON picks the interpreter; else the first of python3, python, .venv/bin/python that has
# pytest, xdist and torch, else the first that has pytest and xdist.
set -uo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" || exit 1
out="${1:-${OUT:-/tmp/gpushare-gpu-kit}}"
mkdir -p "$out" || exit 1
out="$(cd "$out" && pwd)"
rm -f "$out"/record.txt "$out"/kit-log.txt "$out"/runs.txt "$out"/nvidia-smi.txt "$out"/reports.json "$out"/timeline.svg
log="$out/kit-log.txt"

say() { echo "gpu kit: $*" | tee -a "$log"; }

pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
    return
  fi
  local candidate fallback=""
  for candidate in python3 python "$root/.venv/bin/python"; do
    candidate="$(command -v "$candidate")" || continue
    if "$candidate" -c "import pytest, xdist, torch" >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
    if [ -z "$fallback" ] && "$candidate" -c "import pytest, xdist" >/dev/null 2>&1; then
      fallback="$candidate"
    fi
  done
  echo "${fallback:-python3}"
}

# Installed from this checkout, entry point included? (Asked from / so that the checkout
# itself is not what gets imported.)
installed_here() {
  (cd / && "$py" - "$root" <<'PY'
import importlib.metadata as md, pathlib, sys
try:
    import pytest_gpushare
except Exception:
    sys.exit(1)
here = pathlib.Path(pytest_gpushare.__file__).resolve().parents[1] == pathlib.Path(sys.argv[1]).resolve()
plugin = any(e.value == "pytest_gpushare.plugin" for e in md.entry_points(group="pytest11"))
sys.exit(0 if here and plugin else 1)
PY
  )
}

py="$(pick_python)"
py="$(command -v "$py")" || { echo "gpu kit: no Python found" >&2; exit 1; }
say "python $py ($("$py" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
if installed_here; then
  say "pytest-gpushare is installed from this checkout already"
# The device machine reaches no package index: build with the setuptools it has.
elif timeout 120 "$py" -m pip install -q --no-deps --no-build-isolation -e "$root" >>"$log" 2>&1 \
  || timeout 120 "$py" -m pip install -q --no-deps -e "$root" >>"$log" 2>&1; then
  say "installed: pip install --no-deps -e $root"
else
  say "pip install failed (see above); using the checkout through PYTHONPATH and PYTEST_PLUGINS"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTEST_PLUGINS=pytest_gpushare.plugin
fi

export GPUKIT_OUT="$out"
# The kit's own session is no subject of the plugin (-p no:gpushare): only its sub-runs are.
kit=(-m pytest tests/gpu -p no:randomly -p no:cacheprovider -p no:gpushare -v)
say "python ${kit[*]}  (record in $out)"
timeout --kill-after=10 270 "$py" "${kit[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}

if [ ! -s "$out/record.txt" ]; then
  printf 'gpushare real-GPU check\nresult: the kit wrote no record (exit %s): see kit-log.txt\n' "$rc" >"$out/record.txt"
fi
case "$rc" in
  0) say "done: $(sed -n 2p "$out/record.txt")" ;;
  124 | 137) say "the kit ran past its 270 s and was stopped"; rc=1 ;;
  *) say "failed (pytest exit $rc): $(sed -n 2p "$out/record.txt")"; rc=1 ;;
esac
exit "$rc"
