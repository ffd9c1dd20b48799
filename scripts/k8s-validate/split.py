"""Sorts the objects of one rendered overlay for scripts/validate-k8s.sh, and checks the
Grafana dashboards among them.

    python3 split.py RENDERED.yaml OVERLAY OUT_DIR METRICS_SOURCE...

writes OUT_DIR/core.yaml (objects of Kubernetes' own API groups, for kubernetes-validate)
and OUT_DIR/custom.json (every other object, for custom.mjs). A ConfigMap labelled
`grafana_dashboard` holds dashboards: each must be JSON whose queries name only metrics that
METRICS_SOURCE files (the replica's Rust sources) define, so that renaming a metric without
the dashboard fails here rather than leaving an empty panel.
"""

import json
import re
import sys

import yaml


def is_kubernetes_group(api_version):
    # Kubernetes' own groups have no dot ("apps", "policy", core "v1") or end in .k8s.io.
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def exprs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from exprs(value)


def panel_ids(panels):
    for panel in panels:
        yield panel.get("id")
        yield from panel_ids(panel.get("panels", []))


def check_dashboard(where, text, known):
    errors = []
    try:
        dashboard = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"{where}: not JSON: {e}"], 0
    for field in ("uid", "title", "panels"):
        if not dashboard.get(field):
            errors.append(f"{where}: no {field}")
    ids = list(panel_ids(dashboard.get("panels", [])))
    if None in ids or len(ids) != len(set(ids)):
        errors.append(f"{where}: every panel needs an id of its own")
    queries = list(exprs(dashboard))
    if not queries:
        errors.append(f"{where}: no queries")
    for expr in queries:
        for name in sorted(set(re.findall(r"\bge_[a-z0-9_]+", expr))):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in known and base not in known:
                errors.append(f"{where}: query names {name}, which the replica does not export: {expr}")
    return errors, len(queries)


def main():
    rendered, overlay, out_dir, *sources = sys.argv[1:]
    known = set()
    for path in sources:
        with open(path, encoding="utf-8") as f:
            known.update(re.findall(r'"(ge_[a-z0-9_]+)"', f.read()))
    if not known:
        sys.exit(f"{overlay}: no metric names found in {' '.join(sources)}")

    with open(rendered, encoding="utf-8") as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    core, custom, errors = [], [], []
    for obj in objects:
        (core if is_kubernetes_group(obj.get("apiVersion", "")) else custom).append(obj)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if obj.get("kind") == "ConfigMap" and "grafana_dashboard" in labels:
            for key, text in (obj.get("data") or {}).items():
                where = f"{overlay}: ConfigMap/{obj['metadata']['name']} {key}"
                problems, count = check_dashboard(where, text, known)
                errors += problems
                if not problems:
                    print(f"INFO {where}: a Grafana dashboard, {count} queries, every metric exported by the replica")

    with open(f"{out_dir}/core.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    with open(f"{out_dir}/custom.json", "w", encoding="utf-8") as f:
        json.dump([{"overlay": overlay, "object": o} for o in custom], f)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
