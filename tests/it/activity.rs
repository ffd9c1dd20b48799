//! The operators' views of a plan in progress: `GET /api/activity` (throughput and dispatch
//! latency per minute, bounded to its window) and the filters of `status` on the command line.

use std::process::Command;

use serde_json::Value;

use crate::harness::{BIN, ROUTING, Replica, T, TestEnv, eventually, http, http_settings, wait_ready};

fn sum(buckets: &[Value], field: &str) -> i64 {
    buckets.iter().map(|b| b[field].as_i64().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_counts_the_windows_dispatches_and_completions_and_their_latency() {
    let env = TestEnv::start(ROUTING).await;
    let (settings, port) = http_settings(&env, "act-1", None);
    let replica = Replica::spawn(settings);
    wait_ready(port).await;

    // A long history before anything else: 100,000 events five hours old.
    sqlx::query(
        "INSERT INTO work_package_events (wp_id, at, status)
         SELECT 'ancient.' || g, now() - interval '5 hours' + g * interval '1 ms', 'completed' FROM generate_series(1, 100000) g",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // Old history: five work packages run to completion, then moved two hours back, as a
    // long-running system's history is; the window must leave them out.
    for i in 0..5 {
        env.submit(&[("wp_id", &format!("old.{i}")), ("agent_id", "dolly")]).await;
    }
    for i in 0..5 {
        let wp = format!("old.{i}");
        let t = eventually(T, "an old trigger", || async { env.triggers("dolly").await.into_iter().find(|t| t["wp_id"] == wp) }).await;
        env.complete(&t).await;
    }
    eventually(T, "the old work completed", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE status = 'completed'").fetch_one(&env.pool).await.unwrap();
        (n == 5).then_some(())
    })
    .await;
    sqlx::query("UPDATE work_package_events SET at = at - interval '2 hours'").execute(&env.pool).await.unwrap();

    // Now: a lane of three, each completed as it comes, and one failure that is retried.
    for i in 0..3 {
        env.submit(&[("wp_id", &format!("now.{i}")), ("agent_id", "dolly"), ("lane", "l")]).await;
    }
    env.submit(&[("wp_id", "now.flaky"), ("agent_id", "ada")]).await;
    for i in 0..3 {
        let wp = format!("now.{i}");
        let t = eventually(T, "a trigger", || async { env.triggers("dolly").await.into_iter().find(|t| t["wp_id"] == wp) }).await;
        env.complete(&t).await;
    }
    let t =
        eventually(T, "the flaky trigger", || async { env.triggers("ada").await.into_iter().find(|t| t["wp_id"] == "now.flaky") }).await;
    env.fail(&t, true).await;
    eventually(T, "the lane completed and the failure recorded", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE wp_id LIKE 'now.%' AND status IN ('completed', 'retry_wait')")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        (n == 4).then_some(())
    })
    .await;
    // Retention deletes old events; a gap in the ids is stepped over.
    sqlx::query("DELETE FROM work_package_events WHERE wp_id = 'old.2'").execute(&env.pool).await.unwrap();

    let (code, v) = http(port, "GET", "/api/activity?minutes=60", None, None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["minutes"], 60);
    let buckets = v["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 60, "one bucket per minute");
    assert!(buckets.windows(2).all(|w| w[0]["minute"].as_str() < w[1]["minute"].as_str()), "oldest first");
    assert_eq!(sum(buckets, "dispatched"), 4, "{v}");
    assert_eq!(sum(buckets, "completed"), 3, "{v}");
    assert_eq!(sum(buckets, "failed"), 1, "{v}");
    let samples: i64 = buckets.iter().filter_map(|b| b["latency_ms"]["samples"].as_i64()).sum();
    assert_eq!(samples, 4, "every first dispatch of the window is measured: {v}");
    for b in buckets.iter().filter(|b| !b["latency_ms"].is_null()) {
        let l = &b["latency_ms"];
        let (p50, p95, max) = (l["p50"].as_f64().unwrap(), l["p95"].as_f64().unwrap(), l["max"].as_f64().unwrap());
        assert!(0.0 <= p50 && p50 <= p95 && p95 <= max, "{b}");
    }
    // A wider window reaches the old history.
    let (_, wide) = http(port, "GET", "/api/activity?minutes=180", None, None).await;
    assert_eq!(sum(wide["buckets"].as_array().unwrap(), "completed"), 3 + 4, "{wide}");

    // The read touched the window's events, not the history: no sequential scan of the events,
    // and a few hundred rows fetched by key at most (PostgreSQL publishes a connection's
    // counters within seconds of its statement).
    let counters = || async {
        sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT coalesce(seq_tup_read, 0), coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0)
             FROM pg_stat_user_tables WHERE relname = 'work_package_events'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let settled = eventually(T, "the counters settled", || async {
        let a = counters().await;
        tokio::time::sleep(std::time::Duration::from_secs(12)).await;
        (counters().await == a).then_some(a)
    })
    .await;
    let (code, _) = http(port, "GET", "/api/activity?minutes=60", None, None).await;
    assert_eq!(code, 200);
    let after = eventually(T, "the read's counters published", || async { Some(counters().await).filter(|c| c.1 > settled.1) }).await;
    assert_eq!(after.0, settled.0, "the activity read scanned the events sequentially");
    assert!(after.2 - settled.2 < 500, "the activity read fetched {} events for a window of about 30", after.2 - settled.2);

    for bad in ["0", "181", "x"] {
        let (code, v) = http(port, "GET", &format!("/api/activity?minutes={bad}"), None, None).await;
        assert_eq!(code, 400, "minutes={bad}: {v}");
    }
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_of_an_empty_history_is_a_row_of_zeros() {
    let env = TestEnv::start(ROUTING).await;
    let (settings, port) = http_settings(&env, "act-2", None);
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    let (code, v) = http(port, "GET", "/api/activity?minutes=5", None, None).await;
    assert_eq!(code, 200, "{v}");
    let buckets = v["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 5);
    assert!(buckets.iter().all(|b| b["dispatched"] == 0 && b["completed"] == 0 && b["latency_ms"].is_null()), "{v}");
    replica.stop().await;
}

fn status(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).arg("status").args(args).env("DATABASE_URL", &env.database_url).output().expect("run status");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn listed(env: &TestEnv, args: &[&str]) -> Vec<String> {
    let (ok, out, err) = status(env, &[args, &["--json"]].concat());
    assert!(ok, "status {args:?}: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["work_packages"].as_array().unwrap().iter().map(|w| w["wp_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_filters_by_status_lane_agent_and_plan_together() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("st-1");
    // Two plans; in each, a lane of two on dolly (the second blocked behind the first) and one
    // work package on ada; `p1.sub.x` belongs to plan p1.sub, not p1.
    for plan in ["p1", "p2"] {
        env.submit(&[("wp_id", &format!("{plan}.a")), ("agent_id", "dolly"), ("lane", &format!("{plan}-lane"))]).await;
        env.submit(&[("wp_id", &format!("{plan}.b")), ("agent_id", "dolly"), ("lane", &format!("{plan}-lane"))]).await;
        env.submit(&[("wp_id", &format!("{plan}.c")), ("agent_id", "ada")]).await;
    }
    env.submit(&[("wp_id", "p1.sub.x"), ("agent_id", "ada")]).await;
    // A plan given by its field, whatever the wp_id says.
    env.submit(&[("wp_id", "solo"), ("agent_id", "ada"), ("plan", "p2")]).await;
    eventually(T, "the work dispatched or blocked", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE status IN ('dispatched', 'blocked')")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        (n == 8).then_some(())
    })
    .await;
    // A row stored before plans were recorded (migration 0008) has none: its wp_id says.
    sqlx::query("UPDATE work_packages SET plan = NULL WHERE wp_id = 'p1.c'").execute(&env.pool).await.unwrap();

    assert_eq!(listed(&env, &["--plan", "p1"]), ["p1.a", "p1.b", "p1.c"]);
    assert_eq!(listed(&env, &["--plan", "p1."]), ["p1.a", "p1.b", "p1.c"], "a trailing dot is the same plan");
    assert_eq!(listed(&env, &["--plan", "p1.sub"]), ["p1.sub.x"]);
    assert_eq!(listed(&env, &["--status", "blocked"]), ["p1.b", "p2.b"]);
    assert_eq!(listed(&env, &["--lane", "p2-lane"]), ["p2.a", "p2.b"]);
    assert_eq!(listed(&env, &["--agent", "ada"]), ["p1.c", "p2.c", "p1.sub.x", "solo"]);
    assert_eq!(listed(&env, &["--plan", "p2"]), ["p2.a", "p2.b", "p2.c", "solo"]);
    assert_eq!(listed(&env, &["--agent", "dolly", "--status", "dispatched", "--plan", "p2"]), ["p2.a"]);
    assert!(listed(&env, &["--lane", "p1-lane", "--plan", "p2"]).is_empty());

    // The counts are those of the filters; the text view says so too.
    let (ok, out, _) = status(&env, &["--plan", "p2", "--json"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["counts"], serde_json::json!([["blocked", 1], ["dispatched", 3]]), "{v}");
    let (ok, text, _) = status(&env, &["--lane", "p1-lane"]);
    assert!(ok && text.contains("blocked=1  dispatched=1") && text.contains("p1.b") && !text.contains("p2.a"), "{text}");

    let (ok, _, err) = status(&env, &["--status", "stuck"]);
    assert!(!ok && err.contains("stuck") && err.contains("blocked"), "a bad status names the good ones: {err}");
    replica.stop().await;
}
