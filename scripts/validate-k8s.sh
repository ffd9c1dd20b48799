#!/usr/bin/env bash
# Validates the Kubernetes manifests offline with kubernetes-validate (from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi
kubernetes-validate --strict k8s/base/agents/*.yaml
