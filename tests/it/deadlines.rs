//! Dispatch deadlines (contract v1.1): a hung agent's attempt times out and frees its slot, a
//! late report for it is ignored, and heartbeats keep a long dispatch alive.

use std::time::{Duration, Instant};

use crate::harness::{T, TestEnv, eventually};

const ROUTING: &str = r#"version: 1
agents:
  slow:   { roles: [worker], max_in_flight: 1, timeout: 1s }
  steady: { roles: [checker] }
work_types:
  check: { role: checker, timeout: 1s }
retry: { max_attempts: 3, backoff: { initial: 200ms, factor: 1, max: 1s } }
"#;

async fn trigger(env: &TestEnv, agent: &str, dispatch_id: &str) -> std::collections::HashMap<String, String> {
    eventually(T, &format!("trigger {dispatch_id}"), || async {
        env.triggers(agent).await.into_iter().find(|t| t["dispatch_id"] == dispatch_id)
    })
    .await
}

#[tokio::test]
async fn a_hung_agent_times_out_and_frees_its_slot() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "hung"), ("agent_id", "slow")]).await;
    env.submit(&[("wp_id", "next"), ("agent_id", "slow")]).await;
    trigger(&env, "slow", "hung:1").await;

    // Nobody reports on hung:1; its deadline passes and the slot goes to the next one.
    trigger(&env, "slow", "next:1").await;
    let error: Option<String> =
        sqlx::query_scalar("SELECT last_error FROM work_packages WHERE wp_id = 'hung'").fetch_one(&env.pool).await.expect("hung");
    let error = error.expect("the timeout is recorded as the attempt's error");
    assert!(error.contains("no report within the timeout of 1s") && error.contains("hung:1"), "{error}");

    // The late report of the expired attempt changes nothing.
    env.report("ge:work:completed", &[("wp_id", "hung"), ("dispatch_id", "hung:1")]).await;
    eventually(T, "everything acknowledged", || async { (env.pending().await == 0).then_some(()) }).await;
    assert_ne!(env.status("hung").await.as_deref(), Some("completed"), "a report for an expired attempt is ignored");
    env.assert_in_flight_consistent().await;
    replica.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_a_dispatch_alive_until_they_stop() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "long"), ("work_type", "check")]).await;
    trigger(&env, "steady", "long:1").await;

    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3000) {
        env.report("ge:work:heartbeat", &[("wp_id", "long"), ("dispatch_id", "long:1"), ("agent_id", "steady")]).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Three times its 1 s timeout, yet still the first attempt.
    let current: Option<String> =
        sqlx::query_scalar("SELECT dispatch_id FROM work_packages WHERE wp_id = 'long'").fetch_one(&env.pool).await.expect("long");
    assert_eq!(current.as_deref(), Some("long:1"));
    assert_eq!(env.status("long").await.as_deref(), Some("dispatched"));

    // Without heartbeats the deadline passes and the work goes out again.
    trigger(&env, "steady", "long:2").await;

    let bad = env.report("ge:work:heartbeat", &[("wp_id", "long")]).await;
    let dl = eventually(T, "the heartbeat without dispatch_id dead-lettered", || async {
        env.deadletters().await.into_iter().find(|d| d["source_id"] == bad)
    })
    .await;
    assert_eq!(dl["reason"], "invalid");
    replica.stop().await;
}
