//! Rerun (contract v1.6): finished work runs again as a new attempt, with `--downstream` its
//! dependents too, in dependency and lane order; the earlier runs stay in the history; open or
//! running work, and work whose dependency retention removed, is refused.

use std::collections::HashMap;

use crate::harness::{ROUTING, T, TestEnv, eventually, http};
use crate::operations::{cli, sweepless_replica};

const TOKEN: &str = "door-token";

async fn trigger(env: &TestEnv, dispatch_id: &str) -> HashMap<String, String> {
    eventually(T, &format!("a trigger {dispatch_id}"), || async {
        env.triggers("dolly").await.into_iter().find(|t| t["dispatch_id"] == dispatch_id)
    })
    .await
}

async fn status_is(env: &TestEnv, wp: &str, status: &str) {
    eventually(T, &format!("{wp} {status}"), || async { (env.status(wp).await.as_deref() == Some(status)).then_some(()) }).await;
}

/// Completes the dispatch and waits until the orchestrator has applied it.
async fn complete(env: &TestEnv, dispatch_id: &str) {
    let t = trigger(env, dispatch_id).await;
    env.report(
        "ge:work:completed",
        &[("wp_id", &t["wp_id"]), ("dispatch_id", dispatch_id), ("result", &format!("result of {dispatch_id}"))],
    )
    .await;
    status_is(env, &t["wp_id"], "completed").await;
}

async fn statuses(env: &TestEnv, wps: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for wp in wps {
        out.push(env.status(wp).await.unwrap_or_default());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_alone_and_downstream_in_dependency_order_keeping_the_history() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = sweepless_replica(&env, "rerun-1").await;
    env.submit(&[("wp_id", "a"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "b"), ("agent_id", "dolly"), ("depends_on", "a")]).await;
    env.submit(&[("wp_id", "c"), ("agent_id", "dolly"), ("depends_on", "b")]).await;
    for d in ["a:1", "b:1", "c:1"] {
        complete(&env, d).await;
    }

    // Alone: a runs again as attempt 2; what depends on it stays completed.
    let out = cli(&env, &["rerun", "a"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = trigger(&env, "a:2").await;
    assert_eq!(t["attempt"], "2");
    assert_eq!(statuses(&env, &["b", "c"]).await, ["completed", "completed"]);
    // Running work is refused, by the CLI and the API alike.
    let refused = cli(&env, &["rerun", "a"]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("dispatched"));
    let (code, v) = http(port, "POST", "/api/work-packages/a/rerun", Some(TOKEN), None).await;
    assert_eq!(code, 409, "{v}");
    complete(&env, "a:2").await;

    // Downstream, through the API: a, then b, then c, each as a new attempt.
    let (code, v) = http(port, "POST", "/api/work-packages/a/rerun?downstream=true", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["rerun"], serde_json::json!(["a", "b", "c"]));
    trigger(&env, "a:3").await;
    assert_eq!(statuses(&env, &["b", "c"]).await, ["blocked", "blocked"], "b and c wait for a again");
    complete(&env, "a:3").await;
    trigger(&env, "b:2").await;
    assert_eq!(env.status("c").await.as_deref(), Some("blocked"));
    complete(&env, "b:2").await;
    complete(&env, "c:2").await;

    // Every earlier run stays in the history, its result with it.
    let events: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT status, dispatch_id, detail FROM work_package_events WHERE wp_id = 'a' ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let completed: Vec<_> = events.iter().filter(|e| e.0 == "completed").map(|e| e.1.clone().unwrap_or_default()).collect();
    assert_eq!(completed, ["a:1", "a:2", "a:3"]);
    assert!(events.iter().any(|e| e.2.as_deref().is_some_and(|d| d.contains("result of a:1"))), "{events:?}");
    let dispatch_ids: Vec<String> = env.triggers("dolly").await.into_iter().map(|t| t["dispatch_id"].clone()).collect();
    let mut unique = dispatch_ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), dispatch_ids.len(), "no dispatch_id twice: {dispatch_ids:?}");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_keeps_its_lane_place_and_refuses_what_it_cannot_finish() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = sweepless_replica(&env, "rerun-2").await;
    env.submit(&[("wp_id", "l1"), ("agent_id", "dolly"), ("lane", "L")]).await;
    env.submit(&[("wp_id", "l2"), ("agent_id", "dolly"), ("lane", "L")]).await;
    complete(&env, "l1:1").await;
    let t2 = trigger(&env, "l2:1").await;

    // l2 runs: rerunning l1, earlier in the lane, would run beside it.
    let (code, v) = http(port, "POST", "/api/work-packages/l1/rerun", Some(TOKEN), None).await;
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("lane L"), "{v}");
    env.complete(&t2).await;
    status_is(&env, "l2", "completed").await;

    // Now l1 runs again, and a later member of the lane waits for it.
    assert!(cli(&env, &["rerun", "l1"]).status.success());
    trigger(&env, "l1:2").await;
    env.submit(&[("wp_id", "l3"), ("agent_id", "dolly"), ("lane", "L")]).await;
    eventually(T, "l3 ingested", || async { env.status("l3").await }).await;
    assert_ne!(env.status("l3").await.as_deref(), Some("dispatched"));
    complete(&env, "l1:2").await;
    trigger(&env, "l3:1").await;

    // A dependency removed by retention: the rerun would wait for ever, so it is refused.
    env.submit(&[("wp_id", "gone"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "kept"), ("agent_id", "dolly"), ("depends_on", "gone")]).await;
    complete(&env, "gone:1").await;
    complete(&env, "kept:1").await;
    sqlx::query("DELETE FROM work_packages WHERE wp_id = 'gone'").execute(&env.pool).await.unwrap();
    let out = cli(&env, &["rerun", "kept"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no longer stored"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(http(port, "POST", "/api/work-packages/nothing/rerun", Some(TOKEN), None).await.0, 404);
    replica.stop().await;
}

/// An open dependent of a rerun work package waits for it again: its count of unmet
/// prerequisites (migration 0014) grows with the rerun, so it goes only once both are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_dependent_waits_for_the_rerun() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, _port) = sweepless_replica(&env, "rerun-3").await;
    env.submit(&[("wp_id", "up"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "other"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "down"), ("agent_id", "dolly"), ("depends_on", "up,other")]).await;
    complete(&env, "up:1").await;
    trigger(&env, "other:1").await;
    assert!(cli(&env, &["rerun", "up"]).status.success());
    trigger(&env, "up:2").await;
    complete(&env, "other:1").await;
    assert_eq!(env.status("down").await.as_deref(), Some("blocked"), "down waits for the rerun of up");
    complete(&env, "up:2").await;
    trigger(&env, "down:1").await;
    replica.stop().await;
}
