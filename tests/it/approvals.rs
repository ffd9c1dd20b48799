//! (v1.6) Work packages that wait for a person: `waiting` once their dependencies and lane let
//! them go, approved or rejected through the API and the CLI (who and when in the history),
//! the approval reaching the dependents' triggers, timeouts, and waiting work holding nothing
//! else back.

use std::collections::HashMap;
use std::process::Command;

use crate::harness::{BIN, ROUTING, T, TestEnv, eventually, http, http_settings};

const TOKEN: &str = "approvals-token";

async fn status_is(env: &TestEnv, wp: &str, want: &str) {
    eventually(T, &format!("{wp} {want}"), || async { env.status(wp).await.filter(|s| s == want) }).await;
}

async fn trigger_of(env: &TestEnv, agent: &str, wp: &str) -> HashMap<String, String> {
    eventually(T, &format!("the trigger of {wp}"), || async { env.triggers(agent).await.into_iter().find(|t| t["wp_id"] == wp) }).await
}

async fn history(env: &TestEnv, wp: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT status, detail FROM work_package_events WHERE wp_id = $1 ORDER BY id")
        .bind(wp)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

/// Returns once the scheduler's sweep has run since the call: work delayed by a second goes
/// only by a sweep, once it is due.
async fn after_sweeps(env: &TestEnv) {
    let wp = format!("probe-{:08x}", rand::random::<u32>());
    env.submit(&[("wp_id", &wp), ("agent_id", "turing"), ("not_before", "1s")]).await;
    trigger_of(env, "turing", &wp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_completes_the_step_and_its_dependents_get_it() {
    let env = TestEnv::start(ROUTING).await;
    let (settings, port) = http_settings(&env, "r1", Some(TOKEN));
    let replica = crate::harness::Replica::spawn(settings);
    crate::harness::wait_ready(port).await;

    env.submit(&[("wp_id", "rel.build"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "rel.gate"), ("wait_for", "approval"), ("depends_on", "rel.build")]).await;
    env.submit(&[("wp_id", "rel.deploy"), ("agent_id", "dolly"), ("depends_on", "rel.gate")]).await;
    // Not waiting before its dependency is done: an approval now is refused with the reason.
    status_is(&env, "rel.gate", "blocked").await;
    let (code, body) = http(port, "POST", "/api/work-packages/rel.gate/approve", Some(TOKEN), None).await;
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("approve it once it is waiting"), "{body}");

    let build = trigger_of(&env, "dolly", "rel.build").await;
    env.complete(&build).await;
    status_is(&env, "rel.gate", "waiting").await;
    let (_, view) = http(port, "GET", "/api/work-packages/rel.gate", None, None).await;
    assert_eq!(view["wait_for"], "approval", "{view}");
    assert_eq!(view["why"], "waiting for approval", "{view}");
    assert!(env.triggers("dolly").await.iter().all(|t| t["wp_id"] != "rel.deploy"), "the dependent waits");

    // Without the token: refused.
    let (code, _) = http(port, "POST", "/api/work-packages/rel.gate/approve", None, Some("{}")).await;
    assert_eq!(code, 401);
    let (code, body) =
        http(port, "POST", "/api/work-packages/rel.gate/approve", Some(TOKEN), Some(r#"{"comment": "ship it", "by": "alice"}"#)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(env.status("rel.gate").await.as_deref(), Some("completed"));

    // The dependent is dispatched at once, and its trigger carries the approval.
    let deploy = trigger_of(&env, "dolly", "rel.deploy").await;
    let approval: serde_json::Value = serde_json::from_str(&deploy["upstream.rel.gate"]).expect("the approval as JSON");
    assert_eq!(approval["approved"], true);
    assert_eq!(approval["by"], "alice");
    assert_eq!(approval["comment"], "ship it");
    assert!(approval["at"].as_str().unwrap().ends_with('Z'), "{approval}");
    assert!(!deploy.contains_key("upstream.rel.build"), "only the results of waits go upstream: {deploy:?}");

    let h = history(&env, "rel.gate").await;
    assert_eq!(h.last().unwrap(), &("completed".to_string(), Some("approved by alice: ship it".to_string())), "{h:?}");
    assert!(h.iter().any(|(s, d)| s == "waiting" && d.as_deref() == Some("waiting for approval")), "{h:?}");
    // A second approval finds nothing waiting.
    let (code, _) = http(port, "POST", "/api/work-packages/rel.gate/approve", Some(TOKEN), None).await;
    assert_eq!(code, 409);
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_fails_the_step_and_holds_its_dependents_and_lane() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "p.gate"), ("wait_for", "approval"), ("lane", "L")]).await;
    env.submit(&[("wp_id", "p.after"), ("agent_id", "dolly"), ("lane", "L")]).await;
    env.submit(&[("wp_id", "p.dep"), ("agent_id", "dolly"), ("depends_on", "p.gate")]).await;
    status_is(&env, "p.gate", "waiting").await;

    let out = Command::new(BIN)
        .args(["reject", "p.gate", "--comment", "not today", "--by", "bob"])
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", env.redis.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(env.status("p.gate").await.as_deref(), Some("failed"));
    let error: String =
        sqlx::query_scalar("SELECT last_error FROM work_packages WHERE wp_id = 'p.gate'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(error, "rejected by bob: not today");
    let h = history(&env, "p.gate").await;
    assert_eq!(h.last().unwrap(), &("failed".to_string(), Some("rejected by bob: not today".to_string())));

    // Sweeps come and go; the lane successor and the dependent stay held, visibly.
    after_sweeps(&env).await;
    for wp in ["p.after", "p.dep"] {
        assert_eq!(env.status(wp).await.as_deref(), Some("blocked"), "{wp}");
    }
    assert!(env.triggers("dolly").await.iter().all(|t| t["wp_id"] != "p.after" && t["wp_id"] != "p.dep"));

    // A second decision is refused: it is not waiting any more.
    let out = Command::new(BIN)
        .args(["approve", "p.gate"])
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", env.redis.url())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is failed"), "{}", String::from_utf8_lossy(&out.stderr));

    // An operator's retry makes it wait again; an approval then lets the lane and dependent go.
    let out = Command::new(BIN)
        .args(["retry", "p.gate"])
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", env.redis.url())
        .output()
        .unwrap();
    assert!(out.status.success());
    status_is(&env, "p.gate", "waiting").await;
    let out = Command::new(BIN)
        .args(["approve", "p.gate", "--by", "carol"])
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", env.redis.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    trigger_of(&env, "dolly", "p.after").await;
    trigger_of(&env, "dolly", "p.dep").await;
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_ends_the_wait_as_on_timeout_says() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "t.fails"), ("wait_for", "approval"), ("wait_timeout", "1s")]).await;
    env.submit(&[("wp_id", "t.goes"), ("wait_for", "event"), ("wait_key", "never"), ("wait_timeout", "1s"), ("on_timeout", "complete")])
        .await;
    env.submit(&[("wp_id", "t.next"), ("agent_id", "dolly"), ("depends_on", "t.goes")]).await;
    env.submit(&[("wp_id", "forever"), ("wait_for", "approval")]).await;
    status_is(&env, "t.fails", "failed").await;
    let error: String =
        sqlx::query_scalar("SELECT last_error FROM work_packages WHERE wp_id = 't.fails'").fetch_one(&env.pool).await.unwrap();
    assert!(error.starts_with("no approval within the wait_timeout of 1.0 s; failed"), "{error}");
    status_is(&env, "t.goes", "completed").await;
    let next = trigger_of(&env, "dolly", "t.next").await;
    let result: serde_json::Value = serde_json::from_str(&next["upstream.t.goes"]).unwrap();
    assert_eq!(result["timeout"], true);
    // Without a timeout it waits on.
    assert_eq!(env.status("forever").await.as_deref(), Some("waiting"));
    replica.stop().await;
}

/// Waiting work needs no agent and holds no slot: a thousand approvals waiting (routable to
/// no agent at all) hold nothing back, and rounds do not read them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_work_holds_nothing_back_and_rounds_do_not_read_it() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    for i in 0..200 {
        env.submit(&[("wp_id", &format!("w.{i}")), ("wait_for", "approval")]).await;
    }
    env.submit(&[("wp_id", "busy"), ("agent_id", "ada")]).await;
    trigger_of(&env, "ada", "busy").await;
    eventually(T, "every approval waiting", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE status = 'waiting'").fetch_one(&env.pool).await.unwrap();
        (n == 200).then_some(())
    })
    .await;
    // Each was written once on its way to waiting, whatever the rounds did since (the sweep
    // runs every 100 ms here).
    let before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work_package_events WHERE wp_id LIKE 'w.%'").fetch_one(&env.pool).await.unwrap();
    after_sweeps(&env).await;
    let after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work_package_events WHERE wp_id LIKE 'w.%'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(before, after);
    assert_eq!(before, 200, "straight to waiting, no detour through ready");
    env.assert_in_flight_consistent().await;
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_wait_fields_are_dead_lettered_with_a_reason() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "bad1"), ("wait_for", "someone")]).await;
    env.submit(&[("wp_id", "bad2"), ("wait_for", "event")]).await;
    env.submit(&[("wp_id", "bad3"), ("wait_for", "approval"), ("wait_timeout", "whenever")]).await;
    let dls = eventually(T, "three dead letters", || async { Some(env.deadletters().await).filter(|d| d.len() == 3) }).await;
    let details: Vec<&str> = dls.iter().map(|d| d["detail"].as_str()).collect();
    assert!(details[0].contains("neither approval nor event"), "{details:?}");
    assert!(details[1].contains("needs a wait_key"), "{details:?}");
    assert!(details[2].contains("not a duration"), "{details:?}");
    assert!(dls.iter().all(|d| d["reason"] == "invalid"));
    replica.stop().await;
}
