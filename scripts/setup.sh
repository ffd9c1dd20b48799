#!/usr/bin/env bash
# Installs what ge-orchestrator's dev stack, tests and CI need, when it is missing: Rust's cargo
# (checked, not installed) with rustfmt and clippy, redis-server, redis-sentinel (the failover
# test's Sentinels), the PostgreSQL server
# binaries, Chromium and Node.js (from Debian's packages), playwright-core (npm, into
# tests/browser/node_modules, from the committed package-lock.json) and schemathesis (PyPI);
# with --peer also BullMQ (npm, into tools/peer/node_modules, for `bench --workloads peer`).
# Idempotent. It never starts or enables the system services: the orchestrator starts its own
# throwaway instances on free ports.
set -euo pipefail

say() { echo "setup: $*"; }

if command -v cargo >/dev/null 2>&1; then
  say "cargo found ($(cargo --version))"
else
  say "cargo not found. Install Rust with rustup (https://rustup.rs): curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
  exit 1
fi
# CI's gates (.ci/run): rustfmt and clippy, which rustup's default profile has.
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
  say "rustfmt and clippy found"
elif command -v rustup >/dev/null 2>&1; then
  say "installing rustfmt and clippy (rustup component add)"
  rustup component add rustfmt clippy
else
  say "cargo fmt or cargo clippy missing, and no rustup to add them. Install Rust with rustup (https://rustup.rs)"
  exit 1
fi

have_redis() { command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || [ -x /usr/local/bin/redis-server ]; }
have_sentinel() { command -v redis-sentinel >/dev/null 2>&1 || [ -x /usr/bin/redis-sentinel ] || [ -x /usr/local/bin/redis-sentinel ]; }
have_postgres() {
  local bindir
  bindir=$(pg_config --bindir 2>/dev/null || true)
  if [ -n "$bindir" ] && [ -x "$bindir/postgres" ] && [ -x "$bindir/initdb" ]; then return 0; fi
  compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null
}

missing=()
if have_redis; then say "redis-server found"; else missing+=(redis-server); fi
if have_sentinel; then say "redis-sentinel found"; else missing+=(redis-sentinel); fi
if have_postgres; then say "postgres server binaries found"; else missing+=(postgresql); fi
# The dashboard's browser test: Debian's Chromium, driven by playwright-core under Node.js.
if [ -x /usr/bin/chromium ]; then say "chromium found"; else missing+=(chromium); fi
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then say "node found ($(node --version))"; else missing+=(nodejs npm); fi
# The Python package's tests (sdk/python/test.sh) make a virtualenv: Debian's python3-venv.
if python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then say "python3 with venv found"; else missing+=(python3-venv); fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    say "missing: ${missing[*]}. Install them as root: apt-get install -y ${missing[*]}"
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "missing: ${missing[*]}, and this is not a Debian-like system (no apt-get). Install them with your package manager."
    exit 1
  fi
  say "installing ${missing[*]} from Debian's packages"
  # policy-rc.d keeps the packages' post-install scripts from starting the system services.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod +x "$policy" && created_policy=1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  if [ "$created_policy" -eq 1 ]; then "${sudo[@]}" rm -f "$policy"; fi
  have_redis || { say "redis-server still missing after the install"; exit 1; }
  have_sentinel || { say "redis-sentinel still missing after the install"; exit 1; }
  have_postgres || { say "postgres still missing after the install"; exit 1; }
  say "installed ${missing[*]}"
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -d "$root/tests/browser/node_modules/playwright-core" ]; then
  say "playwright-core found"
else
  say "installing playwright-core into tests/browser (npm ci)"
  (cd "$root/tests/browser" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
fi

# The admin API's OpenAPI test (tests/it/api_schema.rs).
if command -v schemathesis >/dev/null 2>&1 || python3 -c 'import schemathesis' >/dev/null 2>&1; then
  say "schemathesis found"
else
  say "installing schemathesis from PyPI"
  python3 -m pip install --quiet 'schemathesis>=4,<5'
  command -v schemathesis >/dev/null 2>&1 || python3 -c 'import schemathesis' >/dev/null 2>&1 || { say "schemathesis still missing after the install"; exit 1; }
fi

# The bench's peer workload (tools/peer): only when asked. The bench runs the same npm ci
# itself when the workload is named and BullMQ is missing (tests/bench.rs relies on that).
if [[ " $* " == *" --peer "* ]]; then
  if [ -d "$root/tools/peer/node_modules/bullmq" ]; then
    say "bullmq found"
  else
    say "installing bullmq into tools/peer (npm ci)"
    (cd "$root/tools/peer" && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi
