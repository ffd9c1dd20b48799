#!/usr/bin/env bash
# Runs schemathesis (PyPI) against a running replica's admin API, from the OpenAPI document it
# serves. Usage: scripts/schemathesis.sh http://127.0.0.1:8080 [extra schemathesis args]
# GE_ADMIN_TOKEN, when set, is sent as the bearer token so changing calls are exercised too.
set -euo pipefail
base="${1:?usage: scripts/schemathesis.sh BASE_URL [args]}"
shift
if command -v schemathesis >/dev/null 2>&1; then
  st=(schemathesis)
else
  st=(python3 -m schemathesis.cli)
fi
auth=()
if [ -n "${GE_ADMIN_TOKEN:-}" ]; then auth=(-H "Authorization: Bearer ${GE_ADMIN_TOKEN}"); fi
# The repository's schemathesis.toml: what a schema cannot say about some operations.
config="$(cd "$(dirname "$0")/.." && pwd)/schemathesis.toml"
exec "${st[@]}" --config-file "$config" run "$base/api/openapi.json" --url "$base" "${auth[@]}" \
  --checks all --max-examples "${ST_MAX_EXAMPLES:-25}" --workers 1 --request-timeout 10 "$@"
