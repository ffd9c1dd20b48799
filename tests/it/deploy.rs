//! The deployment files stay in step with the code.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The ConfigMap in the Kubernetes manifest carries a valid routing file, resolving to the
/// same table as config/dolly-routing.yaml.
#[test]
fn configmap_routing_matches_the_default_file() {
    let manifest = std::fs::read_to_string(root().join("k8s/base/agents/ge-orchestrator.yaml")).unwrap();
    let start = manifest.find("dolly-routing.yaml: |").expect("the ConfigMap key") + "dolly-routing.yaml: |".len();
    let embedded: String = manifest[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let from_manifest = ge_orchestrator::core::routing_file::parse(&embedded, "configmap").unwrap_or_else(|e| panic!("{e}"));
    let from_repo = ge_orchestrator::core::routing_file::load(&root().join("config/dolly-routing.yaml")).unwrap();
    let table = |t: &ge_orchestrator::core::routing_file::RoutingTable| t.describe().lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(table(&from_manifest), table(&from_repo));
}
