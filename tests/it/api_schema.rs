//! The admin API against its own OpenAPI document, with schemathesis (PyPI): every operation,
//! with generated valid and invalid input, must answer as documented and never with a 5xx.

use std::path::Path;
use std::time::Duration;

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually, http_settings, wait_ready};

const TOKEN: &str = "schemathesis-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_conforms_to_its_openapi_document() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let env = TestEnv::start(ROUTING).await;
    let (settings, port) = http_settings(&env, "st-1", Some(TOKEN));
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    // Something to look at: work in several states and a dead letter.
    env.submit(&[("wp_id", "st-a"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "st-b"), ("agent_id", "dolly"), ("depends_on", "st-a"), ("lane", "l1")]).await;
    env.submit(&[("wp_id", "st-c"), ("agent_id", "ghost")]).await;
    eventually(T, "a dead letter", || async { (!env.deadletters().await.is_empty()).then_some(()) }).await;

    let out = tokio::process::Command::new(root.join("scripts/schemathesis.sh"))
        .arg(format!("http://127.0.0.1:{port}"))
        .env("GE_ADMIN_TOKEN", TOKEN)
        .env("ST_MAX_EXAMPLES", std::env::var("ST_MAX_EXAMPLES").unwrap_or_else(|_| "20".into()))
        .env("NO_COLOR", "1")
        // schemathesis keeps a cache of past failures in its working directory.
        .current_dir(env.dir.path())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), out)
        .await
        .expect("schemathesis finished in time")
        .expect("run schemathesis (scripts/setup.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "schemathesis found problems:\n{stdout}\n{stderr}");
    replica.stop().await;
}

/// Every route of the admin API is in the OpenAPI document, and the document names no route
/// that does not exist, so schemathesis sees the whole API.
#[test]
fn the_openapi_document_lists_every_route() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut source = std::fs::read_to_string(root.join("src/ops/admin.rs")).unwrap();
    source += &std::fs::read_to_string(root.join("src/ops/schedules.rs")).unwrap();
    let re = regex::Regex::new(r#"\.route\("(/api/[^"]+)",\s*(get|post|put|delete)"#).unwrap();
    let mut routes: Vec<String> = re.captures_iter(&source).map(|c| format!("{} {}", &c[2], &c[1])).collect();
    routes.retain(|r| r != "get /api/openapi.json");
    routes.sort();
    let doc: serde_json::Value = serde_json::from_str(ge_orchestrator::ops::admin::OPENAPI).expect("openapi.json is JSON");
    let mut documented: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| format!("{m} {path}")))
        .collect();
    documented.sort();
    assert_eq!(routes, documented);
}
