#!/usr/bin/env bash
# The Python package's tests against a ge-orchestrator binary, run by scripts/test after
# `cargo test`: a virtualenv with the dependencies in a cache directory (GE_PY_VENV, default
# ${XDG_CACHE_HOME:-~/.cache}/ge-orchestrator/sdk-python-venv), the package built from this
# checkout and installed into a directory of the run's own, then pytest. The binary is GE_ORCHESTRATOR_BIN, else
# the debug build of the cargo target directory (which `cargo test` has just built).
set -euo pipefail
cd "$(dirname "$0")"
say() { echo "sdk/python: $*"; }

if [ -z "${GE_ORCHESTRATOR_BIN:-}" ]; then
  target="$(cd ../.. && cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
  export GE_ORCHESTRATOR_BIN="$target/debug/ge-orchestrator"
fi
[ -x "$GE_ORCHESTRATOR_BIN" ] || { say "no binary at $GE_ORCHESTRATOR_BIN (cargo build, or set GE_ORCHESTRATOR_BIN)"; exit 1; }

venv="${GE_PY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ge-orchestrator/sdk-python-venv}"
mkdir -p "$(dirname "$venv")"
# The virtualenv holds the dependencies only (from PyPI, once) and is shared by every checkout
# and CI clone on the machine: made and topped up under a lock.
(
  flock 9
  if [ ! -x "$venv/bin/python" ]; then
    say "creating a virtualenv in $venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'setuptools>=70.1' 'redis>=5' 'PyYAML>=6' 'pytest>=8' 'pytest-asyncio>=0.23' 'opentelemetry-sdk>=1.20' 'opentelemetry-exporter-otlp-proto-http>=1.20'
) 9>"$venv.lock"
# This checkout's package, built and installed into a directory of this run's own.
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps --target "$site" .
# Build leftovers of the install, so the checkout stays as it was.
rm -rf build src/*.egg-info
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

say "pytest against $GE_ORCHESTRATOR_BIN"
# A missing binary, redis-server or PostgreSQL is a failure here, not a skip.
GE_SDK_REQUIRE_STACK=1 "$venv/bin/python" -m pytest -p no:cacheprovider -q tests "$@"
