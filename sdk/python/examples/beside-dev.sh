#!/usr/bin/env bash
# The Python example beside `ge-orchestrator dev`, in one command (from the repository root):
#
#   sdk/python/examples/beside-dev.sh [path/to/ge-orchestrator]
#
# 1. starts `ge-orchestrator dev` (its own Redis and PostgreSQL, 2 replicas, demo agents for
#    dolly, ada and turing, the sample plan) on a copy of config/dolly-routing.yaml;
# 2. once dev's plan is done, puts sdk/python/examples/routing.yaml (the same agents plus
#    `writer` and `reviewer`) in place of that copy and reloads the replicas;
# 3. runs model_agent.py (the Python agents, calling a fake local model), submits plan.yaml
#    with submit_plan.py and prints the outcomes; then stops everything.
#
# dev starts a demo agent for every enabled agent of the routing file it starts with, so the
# Python agents' names are added only after it started. Needs the package installed
# (pip install ./sdk/python) in the python3 on PATH, or PYTHON=/path/to/venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/../../.."
bin="${1:-}"
if [ -z "$bin" ]; then
  target="${CARGO_TARGET_DIR:-target}"
  for p in "$target/release/ge-orchestrator" "$target/debug/ge-orchestrator"; do
    [ -x "$p" ] && { bin="$p"; break; }
  done
fi
[ -n "$bin" ] || { echo "no ge-orchestrator binary; build it (cargo build --release) or pass its path" >&2; exit 1; }
python="${PYTHON:-python3}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
cp config/dolly-routing.yaml "$work/routing.yaml"
"$bin" dev --config "$work/routing.yaml" --log-dir "$work/logs" >"$work/dev.out" 2>&1 &
pids+=($!)
echo "waiting for ge-orchestrator dev (log: $work/dev.out)"
for _ in $(seq 600); do
  grep -q "the stack keeps running" "$work/dev.out" && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/dev.out"; exit 1; }
  sleep 0.5
done
line="$(grep "the stack keeps running" "$work/dev.out")" || { cat "$work/dev.out"; exit 1; }
REDIS_URL="$(sed -E 's/.*REDIS_URL=([^ ]+).*/\1/' <<<"$line")"
GE_ADMIN_URL="$(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$work/dev.out" | head -1)"
export REDIS_URL GE_ADMIN_URL
echo "dev is up: REDIS_URL=$REDIS_URL, admin API at $GE_ADMIN_URL"
cp sdk/python/examples/routing.yaml "$work/routing.yaml"
"$bin" reload --redis-url "$REDIS_URL" >/dev/null
# Every replica has the new routing once its admin API lists writer.
for url in $(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$work/dev.out" | sort -u); do
  "$python" - "$url" <<'PY'
import json, sys, time, urllib.request
for _ in range(100):
    agents = json.load(urllib.request.urlopen(sys.argv[1] + "/api/agents", timeout=5))
    if any(a["agent_id"] == "writer" for a in agents):
        sys.exit(0)
    time.sleep(0.2)
sys.exit("the replica at %s did not reload the routing" % sys.argv[1])
PY
done
(cd sdk/python/examples && exec "$python" model_agent.py) >"$work/agents.out" 2>&1 &
pids=("${pids[@]:0:1}" $! )
(cd sdk/python/examples && "$python" submit_plan.py) || { echo "--- agents:"; cat "$work/agents.out"; exit 1; }
