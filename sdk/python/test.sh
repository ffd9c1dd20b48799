#!/usr/bin/env bash
# The Python package's tests against a ge-orchestrator binary, run by scripts/test after
# `cargo test`: a virtualenv in a cache directory (GE_PY_VENV, default
# ${XDG_CACHE_HOME:-~/.cache}/ge-orchestrator/sdk-python-venv), the package installed into it
# from this checkout with its test extras, then pytest. The binary is GE_ORCHESTRATOR_BIN, else
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
if [ ! -x "$venv/bin/python" ]; then
  say "creating a virtualenv in $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
# The dependencies (from PyPI, once), then this checkout's package, replaced every run.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'setuptools>=70.1' 'redis>=5' 'PyYAML>=6' 'pytest>=8' 'pytest-asyncio>=0.23' 'opentelemetry-sdk>=1.20'
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall .
# Build leftovers of the install, so the checkout stays as it was.
rm -rf build src/*.egg-info

say "pytest against $GE_ORCHESTRATOR_BIN"
# A missing binary, redis-server or PostgreSQL is a failure here, not a skip.
GE_SDK_REQUIRE_STACK=1 "$venv/bin/python" -m pytest -p no:cacheprovider -q tests "$@"
