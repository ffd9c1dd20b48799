//! The admin API against a real replica: reads, the token on changes, dead-letter requeue
//! after a routing fix, skip, retry and cancel, agents and replicas.

use serde_json::Value;

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually, http, http_settings, wait_ready};

const TOKEN: &str = "s3cret-admin-token";

async fn start(env: &TestEnv, token: Option<&str>) -> (Replica, u16) {
    let (settings, port) = http_settings(env, "r1", token);
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    (replica, port)
}

async fn trigger_of(env: &TestEnv, agent: &str, wp: &str) -> std::collections::HashMap<String, String> {
    eventually(T, &format!("a trigger of {wp} on {agent}"), || async { env.triggers(agent).await.into_iter().find(|t| t["wp_id"] == wp) })
        .await
}

#[tokio::test]
async fn dead_letters_are_requeued_after_a_routing_fix_and_go_through() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = start(&env, Some(TOKEN)).await;

    env.submit(&[("wp_id", "ghost-1"), ("agent_id", "ghost"), ("payload", "{\"x\":1}")]).await;
    env.submit(&[("wp_id", "ghost-2"), ("agent_id", "ghost")]).await;
    let dls = eventually(T, "two dead letters", || async {
        let (code, v) = http(port, "GET", "/api/deadletters", None, None).await;
        assert_eq!(code, 200);
        v.as_array().filter(|a| a.len() == 2).cloned()
    })
    .await;
    // Newest first, with the reason and the original fields.
    assert_eq!(dls[0]["fields"]["wp_id"], "ghost-2");
    assert_eq!(dls[1]["reason"], "unknown_agent");
    assert_eq!(dls[1]["stream"], "ge:work:incoming");
    assert_eq!(dls[1]["fields"]["payload"], "{\"x\":1}");
    assert!(dls[1]["detail"].as_str().unwrap().contains("ghost"));
    let (code, filtered) = http(port, "GET", "/api/deadletters?reason=unknown_agent&limit=1", None, None).await;
    assert_eq!((code, filtered.as_array().map(Vec::len)), (200, Some(1)));

    let id = dls[1]["id"].as_str().unwrap().to_string();
    let path = format!("/api/deadletters/{id}/requeue");
    // Changes need the token.
    assert_eq!(http(port, "POST", &path, None, None).await.0, 401);
    assert_eq!(http(port, "POST", &path, Some("wrong"), None).await.0, 401);

    // The fix: ghost joins the registry; reload through the API.
    let fixed = ROUTING.replace("agents:\n", "agents:\n  ghost:  { roles: [ops] }\n");
    env.write_routing(&fixed);
    let (code, v) = http(port, "POST", "/api/reload", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");

    let (code, v) = http(port, "POST", &path, Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["outcome"], "requeued");
    assert_eq!(v["stream"], "ge:work:incoming");
    let t = trigger_of(&env, "ghost", "ghost-1").await;
    assert_eq!(t["payload"], "{\"x\":1}");
    assert!(!t.contains_key("reason") && !t.contains_key("detail"), "dead-letter metadata stripped: {t:?}");
    // Requeued once only.
    assert_eq!(http(port, "POST", &path, Some(TOKEN), None).await.0, 404);

    // The rest at once.
    let (code, v) = http(port, "POST", "/api/deadletters/requeue", Some(TOKEN), None).await;
    assert_eq!((code, v["requeued"].as_u64()), (200, Some(1)), "{v}");
    trigger_of(&env, "ghost", "ghost-2").await;
    assert!(env.deadletters().await.is_empty());

    env.complete(&t).await;
    eventually(T, "ghost-1 completed", || async { (env.status("ghost-1").await.as_deref() == Some("completed")).then_some(()) }).await;
    let (code, wp) = http(port, "GET", "/api/work-packages/ghost-1", None, None).await;
    assert_eq!(code, 200);
    let statuses: Vec<&str> = wp["history"].as_array().unwrap().iter().map(|e| e["status"].as_str().unwrap()).collect();
    // ghost has no cap: claimed by its ingest, so never stored `ready`.
    assert_eq!(statuses, ["dispatched", "completed"], "{wp}");
    assert_eq!(wp["fields"]["agent_id"], "ghost");
    replica.stop().await;
}

#[tokio::test]
async fn changes_are_refused_with_403_when_no_token_is_configured() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = start(&env, None).await;
    let (code, v) = http(port, "POST", "/api/reload", Some("anything"), None).await;
    assert_eq!(code, 403);
    assert!(v["error"].as_str().unwrap().contains("GE_ADMIN_TOKEN"), "{v}");
    assert_eq!(http(port, "POST", "/api/work-packages/x/cancel", None, None).await.0, 403);
    // Reads stay open.
    assert_eq!(http(port, "GET", "/api/overview", None, None).await.0, 200);
    assert_eq!(http(port, "GET", "/api/openapi.json", None, None).await.0, 200);
    replica.stop().await;
}

#[tokio::test]
async fn skip_retry_and_cancel_through_the_api() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = start(&env, Some(TOKEN)).await;
    env.submit(&[("wp_id", "a"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "b"), ("agent_id", "dolly"), ("depends_on", "a")]).await;
    env.submit(&[("wp_id", "c"), ("agent_id", "dolly"), ("depends_on", "b")]).await;
    let ta = trigger_of(&env, "dolly", "a").await;
    env.fail(&ta, false).await;
    eventually(T, "a failed", || async { (env.status("a").await.as_deref() == Some("failed")).then_some(()) }).await;

    // Why b waits, and the listing filters.
    let (_, b) = http(port, "GET", "/api/work-packages/b", None, None).await;
    assert!(b["why"].as_str().unwrap().contains("waits for dependency a (failed)"), "{b}");
    assert_eq!(b["depends_on"], serde_json::json!(["a"]));
    let (code, failed) = http(port, "GET", "/api/work-packages?status=failed", None, None).await;
    assert_eq!(code, 200);
    let ids: Vec<&str> = failed.as_array().unwrap().iter().map(|w| w["wp_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a"]);
    assert_eq!(http(port, "GET", "/api/work-packages?status=bogus", None, None).await.0, 400);
    assert_eq!(http(port, "GET", "/api/work-packages/nope", None, None).await.0, 404);

    // Retry gives a a new attempt.
    let (code, v) = http(port, "POST", "/api/work-packages/a/retry", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    let ta2 = eventually(T, "a's second attempt", || async {
        env.triggers("dolly").await.into_iter().find(|t| t["wp_id"] == "a" && t["attempt"] == "2")
    })
    .await;
    assert_eq!(http(port, "POST", "/api/work-packages/a/retry", Some(TOKEN), None).await.0, 409);
    env.fail(&ta2, false).await;
    eventually(T, "a failed again", || async { (env.status("a").await.as_deref() == Some("failed")).then_some(()) }).await;

    // Skip: a counts as completed and b goes.
    let (code, v) = http(port, "POST", "/api/work-packages/a/skip", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(env.status("a").await.as_deref(), Some("completed"));
    trigger_of(&env, "dolly", "b").await;
    let (_, a) = http(port, "GET", "/api/work-packages/a", None, None).await;
    assert_eq!(a["result"], "skipped by an operator");
    assert_eq!(http(port, "POST", "/api/work-packages/a/skip", Some(TOKEN), None).await.0, 409);

    // Cancel cascades to c.
    let (code, v) = http(port, "POST", "/api/work-packages/b/cancel", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    let mut cancelled: Vec<&str> = v["cancelled"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    cancelled.sort();
    assert_eq!(cancelled, ["b", "c"]);
    replica.stop().await;
}

#[tokio::test]
async fn agents_show_their_load_and_replicas_their_heartbeats() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = start(&env, Some(TOKEN)).await;
    env.submit(&[("wp_id", "w1"), ("agent_id", "ada")]).await;
    trigger_of(&env, "ada", "w1").await;

    let (code, agents) = http(port, "GET", "/api/agents", None, None).await;
    assert_eq!(code, 200);
    let ada = agents.as_array().unwrap().iter().find(|a| a["agent_id"] == "ada").cloned().unwrap();
    assert_eq!((ada["in_flight"].as_u64(), ada["max_in_flight"].as_u64(), ada["enabled"].as_bool()), (Some(1), Some(4), Some(true)));
    let hopper = agents.as_array().unwrap().iter().find(|a| a["agent_id"] == "hopper").cloned().unwrap();
    assert_eq!(hopper["enabled"], false);

    let replicas: Value = eventually(T, "a heartbeat", || async {
        let (_, v) = http(port, "GET", "/api/replicas", None, None).await;
        v.as_array().filter(|a| !a.is_empty()).map(|_| v.clone())
    })
    .await;
    assert_eq!(replicas[0]["instance"], "r1");
    assert_eq!(replicas[0]["live"], true);
    assert!(replicas[0]["heartbeat"]["config_version"].is_string());

    let (code, o) = http(port, "GET", "/api/overview", None, None).await;
    assert_eq!(code, 200);
    assert_eq!(o["counts"]["dispatched"], 1);
    replica.stop().await;
}

/// One read holds Redis (single-threaded) or a pooled PostgreSQL connection for as long as it
/// takes; a limit is capped at what one page of the dashboard shows.
#[tokio::test]
async fn limits_beyond_one_page_are_refused_and_the_caps_hold() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = start(&env, Some(TOKEN)).await;
    // More than a page of each: work held for the disabled agent, dead letters for a ghost.
    let mut con = env.con.clone();
    let mut pipe = redis::pipe();
    for i in 0..1005 {
        pipe.cmd("XADD").arg("ge:work:incoming").arg("*").arg("wp_id").arg(format!("held-{i}")).arg("agent_id").arg("hopper").ignore();
    }
    for i in 0..505 {
        pipe.cmd("XADD").arg("ge:work:incoming").arg("*").arg("wp_id").arg(format!("dl-{i}")).arg("agent_id").arg("ghost").ignore();
    }
    let () = pipe.query_async(&mut con).await.unwrap();
    eventually(T, "all of it ingested or dead-lettered", || async {
        let (_, o) = http(port, "GET", "/api/overview", None, None).await;
        (o["counts"]["ready"] == 1005 && o["deadletters"] == 505).then_some(())
    })
    .await;

    for (path, max) in [("/api/work-packages", 1000), ("/api/deadletters", 500)] {
        let (code, v) = http(port, "GET", &format!("{path}?limit={}", max + 1), None, None).await;
        assert_eq!(code, 400, "{path} refuses limit={}", max + 1);
        assert!(v["error"].as_str().unwrap().contains(&max.to_string()), "the answer names the cap: {v}");
        assert_eq!(http(port, "GET", &format!("{path}?limit=100000"), None, None).await.0, 400);
        let (code, v) = http(port, "GET", &format!("{path}?limit={max}"), None, None).await;
        assert_eq!((code, v.as_array().map(Vec::len)), (200, Some(max)), "{path}");
    }
    // A reason filter pages through the stream rather than reading it at once.
    let (code, v) = http(port, "GET", "/api/deadletters?reason=unknown_agent&limit=500", None, None).await;
    assert_eq!((code, v.as_array().map(Vec::len)), (200, Some(500)));

    // Requeue all goes through every page once: what is dead-lettered again meanwhile (the
    // ghost is still unknown) is not sent a second time.
    let (code, v) = http(port, "POST", "/api/deadletters/requeue", Some(TOKEN), None).await;
    assert_eq!((code, v["requeued"].as_u64()), (200, Some(505)), "{}", v["requeued"]);
    eventually(T, "the requeued entries dead-lettered again", || async { (env.deadletters().await.len() == 505).then_some(()) }).await;
    replica.stop().await;
}
