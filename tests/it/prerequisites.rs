//! The count of unmet prerequisites (migration 0014) stays exact when a prerequisite completes
//! while its dependent is being ingested or retried: the two transactions are held open at the
//! instant that matters, so each test is deterministic. Without the share lock on the
//! prerequisite's row, the dependent counts it as unmet and the completion, which cannot see
//! the uncommitted dependent, never decrements it: the dependent waits for ever.

use std::collections::BTreeMap;
use std::time::Duration;

use ge_orchestrator::core::entry::WorkPackageSpec;
use ge_orchestrator::engine::store::{self, Routes};

use crate::harness::{ROUTING, TestEnv, eventually};

fn spec(wp: &str, seq: i64, deps: &[&str]) -> WorkPackageSpec {
    let mut fields = BTreeMap::new();
    fields.insert("wp_id".to_string(), wp.to_string());
    WorkPackageSpec {
        wp_id: wp.into(),
        agent_id: Some("dolly".into()),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        fields,
        source_id: format!("1-{seq}"),
        source_ms: 1,
        source_seq: seq,
        ..WorkPackageSpec::default()
    }
}

async fn ingest(pool: &sqlx::PgPool, specs: &[WorkPackageSpec]) {
    let targets = vec!["explicit/agent:dolly".to_string(); specs.len()];
    store::ingest(pool, specs, &Routes { targets: &targets, version: "v", at_once: &[] }).await.unwrap();
}

async fn unmet(pool: &sqlx::PgPool, wp: &str) -> i32 {
    sqlx::query_scalar("SELECT unmet_deps FROM work_packages WHERE wp_id = $1").bind(wp).fetch_one(pool).await.unwrap()
}

/// Waits until some session waits for a row lock: the concurrent statement has reached it.
async fn someone_waits_for_a_lock(pool: &sqlx::PgPool) {
    eventually(Duration::from_secs(10), "a session waiting for a row lock", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetch_one(pool).await.unwrap();
        (n > 0).then_some(())
    })
    .await;
}

/// A completion of `wp` held open: its row is updated (and locked) but not committed, as
/// `completions` holds it between the completion and its commit.
async fn completion_in_flight(pool: &sqlx::PgPool, wp: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    sqlx::query("UPDATE work_packages SET status = 'dispatched', dispatch_id = wp_id || ':1' WHERE wp_id = $1")
        .bind(wp)
        .execute(pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE work_packages SET status = 'completed', completed_at = now() WHERE wp_id = $1")
        .bind(wp)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

#[tokio::test]
async fn a_prerequisite_completing_during_its_dependent_s_ingest_is_counted_as_met() {
    let env = TestEnv::start(ROUTING).await;
    // One with an edge into the batch takes the batched path, one alone the one-by-one path
    // (a dependency on a work package never seen makes a batch take it).
    ingest(&env.pool, &[spec("a", 1, &[]), spec("b", 2, &[])]).await;
    for (prerequisite, batch) in [("a", vec![spec("d", 3, &["a"]), spec("e", 4, &["d"])]), ("b", vec![spec("f", 5, &["b", "never"])])] {
        let tx = completion_in_flight(&env.pool, prerequisite).await;
        let pool = env.pool.clone();
        let ingesting = tokio::spawn(async move { ingest(&pool, &batch).await });
        someone_waits_for_a_lock(&env.pool).await;
        tx.commit().await.unwrap();
        ingesting.await.unwrap();
    }
    assert_eq!(unmet(&env.pool, "d").await, 0, "a was completed when d's count was taken");
    assert_eq!(unmet(&env.pool, "e").await, 1, "d is not");
    assert_eq!(unmet(&env.pool, "f").await, 1, "b is met, `never` is not");
}

#[tokio::test]
async fn a_prerequisite_completing_during_its_dependent_s_retry_is_counted_as_met() {
    let env = TestEnv::start(ROUTING).await;
    ingest(&env.pool, &[spec("a", 1, &[]), spec("d", 2, &["a"])]).await;
    store::cancel(&env.pool, "d").await.unwrap();
    let tx = completion_in_flight(&env.pool, "a").await;
    let pool = env.pool.clone();
    let retrying = tokio::spawn(async move { store::retry(&pool, "d").await.unwrap() });
    someone_waits_for_a_lock(&env.pool).await;
    tx.commit().await.unwrap();
    assert!(retrying.await.unwrap());
    assert_eq!(unmet(&env.pool, "d").await, 0);
}

/// A duplicate prerequisite is one edge and counts once.
#[tokio::test]
async fn a_prerequisite_named_twice_counts_once() {
    let env = TestEnv::start(ROUTING).await;
    ingest(&env.pool, &[spec("a", 1, &[]), spec("d", 2, &["a", "a"])]).await;
    assert_eq!(unmet(&env.pool, "d").await, 1);
}
