//! (v1.6) Work packages that wait for an outside event: events on `ge:work:events` and through
//! `POST /api/events/{key}`, an event that comes before the work package waiting for it kept
//! (and bounded), the event's fields reaching the dependents, malformed events dead-lettered.

use std::collections::HashMap;

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually, http, http_settings, wait_ready};

const TOKEN: &str = "events-token";
const EVENTS: &str = "ge:work:events";

async fn status_is(env: &TestEnv, wp: &str, want: &str) {
    eventually(T, &format!("{wp} {want}"), || async { env.status(wp).await.filter(|s| s == want) }).await;
}

async fn trigger_of(env: &TestEnv, agent: &str, wp: &str) -> HashMap<String, String> {
    eventually(T, &format!("the trigger of {wp}"), || async { env.triggers(agent).await.into_iter().find(|t| t["wp_id"] == wp) }).await
}

async fn kept(env: &TestEnv) -> Vec<(String, bool)> {
    sqlx::query_as("SELECT key, consumed_at IS NOT NULL FROM kept_events ORDER BY id").fetch_all(&env.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_on_the_stream_completes_every_step_waiting_for_its_key() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "ci.wait-a"), ("wait_for", "event"), ("wait_key", "ci:42")]).await;
    env.submit(&[("wp_id", "ci.wait-b"), ("wait_for", "event"), ("wait_key", "ci:42")]).await;
    env.submit(&[("wp_id", "ci.other"), ("wait_for", "event"), ("wait_key", "ci:43")]).await;
    env.submit(&[("wp_id", "ci.merge"), ("agent_id", "dolly"), ("depends_on", "ci.wait-a,ci.wait-b")]).await;
    for wp in ["ci.wait-a", "ci.wait-b", "ci.other"] {
        status_is(&env, wp, "waiting").await;
    }
    env.report(EVENTS, &[("key", "ci:42"), ("conclusion", "success"), ("sha", "abc123")]).await;
    let merge = trigger_of(&env, "dolly", "ci.merge").await;
    for wp in ["ci.wait-a", "ci.wait-b"] {
        let result: serde_json::Value = serde_json::from_str(&merge[&format!("upstream.{wp}")]).unwrap();
        assert_eq!(result["conclusion"], "success");
        assert_eq!(result["sha"], "abc123");
        assert_eq!(result["key"], "ci:42");
    }
    assert_eq!(env.status("ci.other").await.as_deref(), Some("waiting"), "another key is another wait");
    let detail: Option<String> =
        sqlx::query_scalar("SELECT detail FROM work_package_events WHERE wp_id = 'ci.wait-a' AND status = 'completed'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(detail.unwrap().starts_with("event ci:42 arrived (stream:"), "the history says which event");

    // A malformed event is dead-lettered, and the stream goes on.
    env.report(EVENTS, &[("conclusion", "no key")]).await;
    env.report(EVENTS, &[("key", "ci:43")]).await;
    status_is(&env, "ci.other", "completed").await;
    let dl = eventually(T, "the keyless event dead-lettered", || async {
        env.deadletters().await.into_iter().find(|d| d.get("stream").map(String::as_str) == Some(EVENTS))
    })
    .await;
    assert_eq!(dl["reason"], "invalid");
    assert!(dl["detail"].contains("needs a key"), "{dl:?}");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_before_its_step_is_kept_and_taken_when_the_step_comes() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.report(EVENTS, &[("key", "review:7"), ("verdict", "lgtm")]).await;
    eventually(T, "the event kept", || async { Some(kept(&env).await).filter(|k| k == &[("review:7".to_string(), false)]) }).await;

    // A step that comes to wait for it later (behind a dependency) takes it at once.
    env.submit(&[("wp_id", "r.code"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "r.review"), ("wait_for", "event"), ("wait_key", "review:7"), ("depends_on", "r.code")]).await;
    env.submit(&[("wp_id", "r.ship"), ("agent_id", "dolly"), ("depends_on", "r.review")]).await;
    let code = trigger_of(&env, "dolly", "r.code").await;
    status_is(&env, "r.review", "blocked").await;
    env.complete(&code).await;
    let ship = trigger_of(&env, "dolly", "r.ship").await;
    let result: serde_json::Value = serde_json::from_str(&ship["upstream.r.review"]).unwrap();
    assert_eq!(result["verdict"], "lgtm");
    assert_eq!(kept(&env).await, [("review:7".to_string(), true)], "consumed, kept for redeliveries");

    // One that waits at ingest takes a kept event there too.
    env.report(EVENTS, &[("key", "early"), ("n", "1")]).await;
    eventually(T, "the second event kept", || async { Some(kept(&env).await).filter(|k| k.len() == 2) }).await;
    env.submit(&[("wp_id", "late"), ("wait_for", "event"), ("wait_key", "early")]).await;
    status_is(&env, "late", "completed").await;
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_through_the_api_needs_the_token_and_kept_events_are_bounded() {
    let env = TestEnv::start(ROUTING).await;
    let (mut settings, port) = http_settings(&env, "r1", Some(TOKEN));
    settings.event_max_kept = 3;
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    env.submit(&[("wp_id", "hook"), ("wait_for", "event"), ("wait_key", "deploy-done")]).await;
    status_is(&env, "hook", "waiting").await;

    let (code, _) = http(port, "POST", "/api/events/deploy-done", None, Some("{}")).await;
    assert_eq!(code, 401);
    let (code, body) = http(port, "POST", "/api/events/deploy-done", Some(TOKEN), Some(r#"{"env": [1]}"#)).await;
    assert_eq!(code, 400, "fields are text: {body}");
    let (code, body) = http(port, "POST", "/api/events/deploy-done", Some(TOKEN), Some(r#"{"env": "prod"}"#)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["completed"], serde_json::json!(["hook"]));
    assert_eq!(env.status("hook").await.as_deref(), Some("completed"));
    let result: String = sqlx::query_scalar("SELECT result FROM work_packages WHERE wp_id = 'hook'").fetch_one(&env.pool).await.unwrap();
    let result: serde_json::Value = serde_json::from_str(&result).unwrap();
    assert_eq!(result, serde_json::json!({"env": "prod", "key": "deploy-done"}));

    // A flood of events nobody waits for: at most GE_EVENT_MAX_KEPT stay, the newest.
    for i in 0..20 {
        let (code, body) = http(port, "POST", &format!("/api/events/nobody-{i}"), Some(TOKEN), None).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["kept"], true);
    }
    let left = kept(&env).await;
    assert_eq!(left.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["nobody-17", "nobody-18", "nobody-19"]);
    let (_, metrics) = crate::harness::http_get(port, "/metrics").await.unwrap();
    assert!(metrics.contains("ge_events_dropped_total{why=\"count\"}"), "the drops are counted");
    replica.stop().await;
}
