//! `store::ingest` on its own: the multi-row path for work packages without dependencies must
//! decide exactly as entry-by-entry ingest would — inserted, a producer's retry, a conflict —
//! including a wp_id named twice in one batch, where the first in stream order wins.

use std::collections::BTreeMap;

use ge_orchestrator::core::entry::WorkPackageSpec;
use ge_orchestrator::engine::store::{self, IngestOutcome, Routes};

use crate::harness::{ROUTING, TestEnv};

fn spec(wp: &str, seq: i64, payload: &str, deps: &[&str]) -> WorkPackageSpec {
    let mut fields = BTreeMap::new();
    fields.insert("wp_id".to_string(), wp.to_string());
    fields.insert("payload".to_string(), payload.to_string());
    WorkPackageSpec {
        wp_id: wp.into(),
        agent_id: Some("dolly".into()),
        work_type: None,
        trigger: None,
        lane: None,
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        fields,
        source_id: format!("1-{seq}"),
        source_ms: 1,
        source_seq: seq,
        ..WorkPackageSpec::default()
    }
}

/// Every spec goes to dolly, under a routing file of version "v".
async fn ingest(pool: &sqlx::PgPool, specs: &[WorkPackageSpec]) -> Vec<IngestOutcome> {
    let targets = vec!["explicit/agent:dolly".to_string(); specs.len()];
    store::ingest(pool, specs, &Routes { targets: &targets, version: "v" }).await.unwrap()
}

fn reason(o: &IngestOutcome) -> &str {
    match o {
        IngestOutcome::Rejected(r) => r.reason,
        IngestOutcome::Inserted => "inserted",
        IngestOutcome::Duplicate => "duplicate",
    }
}

#[tokio::test]
async fn batched_ingest_decides_like_one_by_one() {
    let env = TestEnv::start(ROUTING).await;
    let first = ingest(&env.pool, &[spec("x", 1, "p", &[]), spec("y", 2, "p", &[])]).await;
    assert_eq!(first.iter().map(reason).collect::<Vec<_>>(), ["inserted", "inserted"]);

    // New, retry, conflict and a dependent one, all in one batch.
    let second =
        ingest(&env.pool, &[spec("a", 3, "p", &[]), spec("x", 4, "p", &[]), spec("y", 5, "other", &[]), spec("b", 6, "p", &["a"])]).await;
    assert_eq!(second.iter().map(reason).collect::<Vec<_>>(), ["inserted", "duplicate", "conflict", "inserted"]);
    let IngestOutcome::Rejected(r) = &second[2] else { unreachable!() };
    assert!(r.detail.contains("payload"), "the conflict names the differing field: {}", r.detail);

    // One wp_id twice in a batch: the first is inserted, the second compared with it.
    let third =
        ingest(&env.pool, &[spec("z", 7, "one", &[]), spec("z", 8, "two", &[]), spec("w", 9, "p", &[]), spec("w", 10, "p", &[])]).await;
    assert_eq!(third.iter().map(reason).collect::<Vec<_>>(), ["inserted", "conflict", "inserted", "duplicate"]);
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT fields FROM work_packages WHERE wp_id = 'z'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(stored["payload"], "one");

    let ready: Vec<String> =
        sqlx::query_scalar("SELECT wp_id FROM work_packages WHERE status = 'ready' ORDER BY wp_id").fetch_all(&env.pool).await.unwrap();
    assert_eq!(ready, ["a", "w", "x", "y", "z"], "no lane, no dependency: ready at once");
    let b: String = sqlx::query_scalar("SELECT status FROM work_packages WHERE wp_id = 'b'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(b, "blocked");
}
