//! `store::ingest` on its own: the multi-row path for work packages without dependencies must
//! decide exactly as entry-by-entry ingest would — inserted, a producer's retry, a conflict —
//! including a wp_id named twice in one batch, where the first in stream order wins.

use std::collections::BTreeMap;

use ge_orchestrator::core::entry::WorkPackageSpec;
use ge_orchestrator::engine::controls::{self, PauseScope};
use ge_orchestrator::engine::store::{self, AtOnce, IngestOutcome, Routes};

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
    store::ingest(pool, specs, &Routes { targets: &targets, version: "v", at_once: &[] }).await.unwrap().outcomes
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

/// Work claimed at ingest is stored `dispatched` by the statement that inserts it: attempt 1,
/// its dispatch_id, its outbox row, its agent's in-flight count, one history row; unless a
/// pause of its agent or plan is committed by then, when it is stored `ready` for the round.
#[tokio::test]
async fn work_claimed_at_ingest_is_stored_dispatched_with_its_outbox_row_unless_paused() {
    let env = TestEnv::start(ROUTING).await;
    controls::pause(&env.pool, PauseScope::Plan, "held", None).await.unwrap();
    let mut held = spec("h", 3, "p", &[]);
    held.plan = Some("held".into());
    let specs = [spec("go", 1, "p", &[]), spec("stays", 2, "p", &[]), held];
    let claim = Some(AtOnce { agent: "dolly".into(), route: "explicit", timeout_ms: Some(60_000) });
    let at_once = [claim.clone(), None, claim];
    let targets = vec!["explicit/agent:dolly".to_string(); specs.len()];
    let ingested = store::ingest(&env.pool, &specs, &Routes { targets: &targets, version: "v", at_once: &at_once }).await.unwrap();
    assert_eq!(ingested.outcomes.iter().map(reason).collect::<Vec<_>>(), ["inserted", "inserted", "inserted"]);
    let claimed: Vec<String> = ingested.dispatched.iter().map(|r| sqlx::Row::get(r, "wp_id")).collect();
    assert_eq!(claimed, ["go"], "only the claim whose plan is not paused");

    let (status, attempts, dispatch_id, agent, deadline): (String, i32, Option<String>, Option<String>, bool) =
        sqlx::query_as("SELECT status, attempts, dispatch_id, agent_id, deadline_at > now() FROM work_packages WHERE wp_id = 'go'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), attempts, dispatch_id.as_deref(), agent.as_deref(), deadline),
        ("dispatched", 1, Some("go:1"), Some("dolly"), true)
    );
    let outbox: Vec<String> = sqlx::query_scalar("SELECT dispatch_id FROM dispatch_outbox").fetch_all(&env.pool).await.unwrap();
    assert_eq!(outbox, ["go:1"]);
    let history: Vec<String> =
        sqlx::query_scalar("SELECT status FROM work_package_events WHERE wp_id = 'go' ORDER BY id").fetch_all(&env.pool).await.unwrap();
    assert_eq!(history, ["dispatched"], "one row version, one history row");
    let in_flight: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(n), 0) FROM agent_in_flight WHERE agent_id = 'dolly'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(in_flight, 1);
    for wp in ["stays", "h"] {
        let status: String =
            sqlx::query_scalar("SELECT status FROM work_packages WHERE wp_id = $1").bind(wp).fetch_one(&env.pool).await.unwrap();
        assert_eq!(status, "ready", "{wp} waits for a round");
    }
}
