//! `/metrics` of a real replica: every family of the minimum set, with values that follow
//! what happened.

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually, http_get, http_settings, wait_ready};

/// The value of the sample `name{labels}` (labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

async fn start(env: &TestEnv, consumer: &str) -> (Replica, u16) {
    let (settings, port) = http_settings(env, consumer, None);
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    (replica, port)
}

#[tokio::test]
async fn metrics_cover_streams_work_agents_and_config() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = start(&env, "m1").await;

    env.submit(&[("wp_id", "m-a"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "m-b"), ("work_type", "implement")]).await;
    env.submit(&[("wp_id", "m-c"), ("agent_id", "nobody")]).await;
    // A report for a work package never submitted: dead-lettered by the completions loop.
    env.report("ge:work:completed", &[("wp_id", "m-ghost")]).await;
    let ta = eventually(T, "m-a dispatched", || async { env.triggers("dolly").await.into_iter().find(|t| t["wp_id"] == "m-a") }).await;
    env.complete(&ta).await;
    eventually(T, "m-a completed", || async { (env.status("m-a").await.as_deref() == Some("completed")).then_some(()) }).await;
    eventually(T, "m-b dispatched", || async { (env.status("m-b").await.as_deref() == Some("dispatched")).then_some(()) }).await;

    let text = eventually(T, "counters in /metrics", || async {
        let (code, body) = http_get(port, "/metrics").await?;
        assert_eq!(code, 200);
        let done = sample(&body, r#"ge_entries_completed_total{route="explicit",agent="dolly"}"#) == Some(1.0);
        (done && sample(&body, "ge_deadletter_entries") == Some(2.0)).then_some(body)
    })
    .await;
    let has = |series: &str, v: f64| {
        assert_eq!(sample(&text, series), Some(v), "{series} in:\n{text}");
    };
    has(r#"ge_entries_routed_total{route="explicit",agent="dolly"}"#, 1.0);
    let routed_b = text.lines().any(|l| l.starts_with(r#"ge_entries_routed_total{route="work_type",agent="#) && l.ends_with(" 1"));
    assert!(routed_b, "m-b routed by work_type:\n{text}");
    has(r#"ge_entries_deadlettered_total{reason="unknown_agent",agent="other"}"#, 1.0);
    // Counted once, though the dead letter is written and noted by one call.
    has(r#"ge_entries_deadlettered_total{reason="unknown_wp",agent=""}"#, 1.0);
    assert!(text.contains("# TYPE ge_dispatch_latency_seconds histogram"), "{text}");
    assert!(text.contains(r#"ge_dispatch_latency_seconds_bucket{route="explicit",agent="dolly",le="+Inf"} 1"#), "{text}");

    has(r#"ge_stream_lag{stream="ge:work:incoming"}"#, 0.0);
    // XPENDING lists only consumers holding entries; none are held once the batch is done.
    assert!(text.contains("# TYPE ge_pending_entries gauge"), "{text}");
    has(r#"ge_work_packages{status="completed"}"#, 1.0);
    has(r#"ge_work_packages{status="dispatched"}"#, 1.0);
    has(r#"ge_work_packages{status="failed"}"#, 0.0);
    has(r#"ge_deadletter_entries"#, 2.0);
    has(r#"ge_agent_capacity{agent="ada"}"#, 4.0);
    has(r#"ge_agent_capacity{agent="hopper"}"#, 0.0);
    assert!(text.contains(r#"ge_agent_capacity{agent="dolly"} +Inf"#), "{text}");
    has(r#"ge_agent_in_flight{agent="dolly"}"#, 0.0);
    let in_flight: f64 = ["ada", "turing"].iter().filter_map(|a| sample(&text, &format!(r#"ge_agent_in_flight{{agent="{a}"}}"#))).sum();
    assert_eq!(in_flight, 1.0, "{text}");
    assert!(text.lines().any(|l| l.starts_with("ge_config_info{config_version=\"") && l.ends_with(" 1")), "{text}");
    has("ge_config_reload_failures_total", 0.0);
    has("ge_scrape_errors", 0.0);

    // A lag appears while no replica reads; a refused reload is counted.
    env.write_routing("version: 1\nagents: {}\nnot_a_key: 1\n");
    let mut con = env.con.clone();
    let _: u64 = redis::cmd("PUBLISH").arg("ge:config:reload").arg("x").query_async(&mut con).await.unwrap();
    eventually(T, "the reload failure counted", || async {
        let (_, body) = http_get(port, "/metrics").await?;
        (sample(&body, "ge_config_reload_failures_total") == Some(1.0)).then_some(())
    })
    .await;
    replica.stop().await;
}

/// A dead letter's `agent_id` is whatever a producer wrote; as a label value each distinct one
/// would be a new series forever. Only the routing file's agents are labels; the rest is `other`.
#[tokio::test]
async fn dead_letter_agent_labels_come_only_from_the_routing_file() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = start(&env, "m2").await;

    for i in 0..5 {
        env.submit(&[("wp_id", &format!("g-{i}")), ("agent_id", &format!("ghost-{i}"))]).await;
    }
    // A known agent keeps its name, whatever the reason.
    env.submit(&[("wp_id", "not valid"), ("agent_id", "dolly")]).await;
    let text = eventually(T, "six dead letters counted", || async {
        let (_, body) = http_get(port, "/metrics").await?;
        let other = sample(&body, r#"ge_entries_deadlettered_total{reason="unknown_agent",agent="other"}"#);
        let dolly = sample(&body, r#"ge_entries_deadlettered_total{reason="invalid",agent="dolly"}"#);
        (other == Some(5.0) && dolly == Some(1.0)).then_some(body)
    })
    .await;
    assert!(!text.contains("ghost-"), "a producer's agent name became a label:\n{text}");
    replica.stop().await;
}
