#!/usr/bin/env bash
# Hold GPU memory for a model server for as long as it runs, and test with what is left.
#
#   bash examples/run/hold-for-server.sh [pytest args...]
#
# SERVER_MEM (default 16GiB) is what the server needs; SERVER_COMMAND starts it (default: a
# stand-in that holds nothing, so the script runs anywhere). Without a GPU, simulate one for
# both sides: GPUSHARE_SIMULATE=24GiB:used=2GiB bash examples/run/hold-for-server.sh
set -euo pipefail
server_mem="${SERVER_MEM:-16GiB}"
read -r -a server <<<"${SERVER_COMMAND:-python -m http.server 0 --bind 127.0.0.1}"

# The lease lives exactly as long as the server: gpushare run waits for the memory, starts the
# command with CUDA_VISIBLE_DEVICES set to the leased GPU, and returns the command's exit code.
gpushare run --mem "$server_mem" -- "${server[@]}" >/dev/null &
run_pid=$!
trap 'kill "$run_pid" 2>/dev/null || true; wait "$run_pid" 2>/dev/null || true' EXIT

# Start the tests once the server's lease is in the ledger.
for _ in $(seq 300); do
  if gpushare status --json | grep -q '"gpushare-run"'; then break; fi
  kill -0 "$run_pid" 2>/dev/null || { echo "gpushare run ended early" >&2; exit 1; }
  sleep 0.1
done
pytest -n auto "$@"
