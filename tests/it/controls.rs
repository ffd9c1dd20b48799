//! Dispatch controls (contract v1.4): priorities with lanes, fair share across plans, rate
//! limits exact across two replicas, pause and resume surviving a replica restart, delayed
//! work.

use std::collections::HashMap;
use std::process::Command;

use crate::harness::{BIN, Replica, T, TestEnv, eventually, http};

const SOLO: &str = r#"version: 1
agents:
  solo: { roles: [worker], max_in_flight: 1 }
  pair: { roles: [pairs], max_in_flight: 2 }
  free: { roles: [other] }
default_agent: solo
"#;

/// The triggers of `agent` not seen before (`seen` of them were).
async fn next_trigger(env: &TestEnv, agent: &str, seen: usize) -> HashMap<String, String> {
    eventually(T, &format!("trigger #{} of {agent}", seen + 1), || async { env.triggers(agent).await.into_iter().nth(seen) }).await
}

async fn wait_reason(env: &TestEnv, wp_id: &str) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>("SELECT wait_reason FROM work_packages WHERE wp_id = $1")
        .bind(wp_id)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
        .flatten()
}

/// Waits until every one of `wp_ids` is stored and waiting with a reason that contains `says`.
async fn waiting(env: &TestEnv, wp_ids: &[&str], says: &str) {
    for wp in wp_ids {
        eventually(T, &format!("{wp} waiting ({says})"), || async { wait_reason(env, wp).await.filter(|r| r.contains(says)) }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_goes_first_and_a_lane_keeps_its_order() {
    let env = TestEnv::start(SOLO).await;
    // Only the rounds of events (ingest, completions): the scheduler's sweep reads blocked work
    // a page at a time, and one whose page missed a lane successor just unblocked could give
    // the slot to lower-priority ready work first.
    let mut settings = env.settings("r1");
    settings.scheduler_interval = std::time::Duration::from_secs(3600);
    let replica = Replica::spawn(settings);
    env.submit(&[("wp_id", "plug"), ("agent_id", "solo")]).await;
    let plug = next_trigger(&env, "solo", 0).await;
    // solo is full: everything below waits, and is dispatched one by one once the plug is done.
    env.submit(&[("wp_id", "a0"), ("agent_id", "solo")]).await;
    env.submit(&[("wp_id", "lane-first"), ("agent_id", "solo"), ("lane", "L")]).await;
    env.submit(&[("wp_id", "lane-second"), ("agent_id", "solo"), ("lane", "L"), ("priority", "90")]).await;
    env.submit(&[("wp_id", "b50"), ("agent_id", "solo"), ("priority", "50")]).await;
    env.submit(&[("wp_id", "c0"), ("agent_id", "solo")]).await;
    env.submit(&[("wp_id", "neg"), ("agent_id", "solo"), ("priority", "-5")]).await;
    waiting(&env, &["a0", "lane-first", "b50", "c0", "neg"], "full").await;
    env.complete(&plug).await;
    let mut order = Vec::new();
    for i in 1..=6 {
        let t = next_trigger(&env, "solo", i).await;
        order.push(t["wp_id"].clone());
        env.complete(&t).await;
    }
    // b50 first; then priority 0 in incoming order, the lane's head among them; the lane's
    // second (90) only after its head, and then before c0; -5 last.
    assert_eq!(order, ["b50", "a0", "lane-first", "lane-second", "c0", "neg"]);
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_plan_is_not_starved_by_a_large_one() {
    let env = TestEnv::start(SOLO).await;
    // Only the rounds of events: a sweep orders its candidates by the work in flight per plan
    // as it read them, before it waits for the agent's lock, so one that read before a
    // completion's round took the lock can order the next slot on a stale count.
    let mut settings = env.settings("r1");
    settings.scheduler_interval = std::time::Duration::from_secs(3600);
    let replica = Replica::spawn(settings);
    // More ready work than one round reads (1,000), all of one plan, for an agent kept full.
    const BIG: usize = 2500;
    for i in 0..BIG {
        env.submit(&[("wp_id", &format!("big.{i}")), ("agent_id", "pair")]).await;
    }
    eventually(T, "the big plan stored", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE plan = 'big'").fetch_one(&env.pool).await.unwrap();
        (n == BIG as i64).then_some(())
    })
    .await;
    let first = [next_trigger(&env, "pair", 0).await, next_trigger(&env, "pair", 1).await];
    for i in 0..3 {
        env.submit(&[("wp_id", &format!("small.{i}")), ("agent_id", "pair")]).await;
    }
    waiting(&env, &["small.0", "small.1", "small.2"], "full").await;
    // Two slots free up per step; the small plan gets one of them each time.
    let mut seen = 2;
    let mut small = 0;
    let mut held = first.to_vec();
    for _ in 0..3 {
        for t in held.drain(..) {
            env.complete(&t).await;
        }
        held = vec![next_trigger(&env, "pair", seen).await, next_trigger(&env, "pair", seen + 1).await];
        seen += 2;
        small += held.iter().filter(|t| t["wp_id"].starts_with("small.")).count();
    }
    assert_eq!(small, 3, "the small plan's three went in the first three rounds of two slots");
    let plan: Option<String> =
        sqlx::query_scalar("SELECT plan FROM work_packages WHERE wp_id = 'small.1'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(plan.as_deref(), Some("small"));
    replica.stop().await;
}

const LIMITED: &str = r#"version: 1
agents:
  slow: { roles: [worker], rate_limit: { per_minute: 60, burst: 3 } }
default_agent: slow
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_exactly_across_two_replicas() {
    let env = TestEnv::start(LIMITED).await;
    let (r1, r2) = (env.replica("r1"), env.replica("r2"));
    const N: usize = 10;
    for i in 0..N {
        env.submit(&[("wp_id", &format!("rl{i}")), ("agent_id", "slow")]).await;
    }
    // The bucket holds 3; the rest wait, saying why.
    let said = eventually(T, "a wait for the rate limit", || async {
        sqlx::query_scalar::<_, String>(
            "SELECT wait_reason FROM work_packages WHERE wait_reason LIKE 'rate limit of slow: next slot in %' LIMIT 1",
        )
        .fetch_optional(&env.pool)
        .await
        .unwrap()
    })
    .await;
    assert!(said.ends_with(" s"), "{said}");
    eventually(T, "every one dispatched", || async { (env.triggers("slow").await.len() == N).then_some(()) }).await;
    r1.stop().await;
    r2.stop().await;
    // The moments of the claims, by the database's clock, in order.
    let at: Vec<f64> =
        sqlx::query_scalar("SELECT extract(epoch FROM at)::float8 FROM work_package_events WHERE status = 'dispatched' ORDER BY at")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(at.len(), N, "each dispatched once");
    // A bucket of 3 refilled at 1 a second: any k consecutive claims span at least k - 3
    // seconds. The 0.05 is the gap between the bucket's clock and the event's, under the lock.
    for i in 0..N {
        for j in i + 3..N {
            let k = (j - i + 1) as f64;
            assert!(at[j] - at[i] >= k - 3.0 - 0.05, "claims {i}..={j} came {:.3} s apart: more than the limit allows", at[j] - at[i]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_hold_work_across_a_replica_restart_until_resumed() {
    const TOKEN: &str = "pause-token";
    let env = TestEnv::start(SOLO).await;
    let vars = [("GE_ADMIN_TOKEN", TOKEN)];
    let (mut child, port) = env.serve_process("p1", &vars, None).await;
    let (code, p) = http(port, "POST", "/api/pauses/plan/nightly", Some(TOKEN), Some(r#"{"reason": "quota spent"}"#)).await;
    assert_eq!(code, 200, "{p}");
    assert_eq!((p["scope"].as_str(), p["name"].as_str(), p["reason"].as_str()), (Some("plan"), Some("nightly"), Some("quota spent")));
    let (code, again) = http(port, "POST", "/api/pauses/plan/nightly", Some(TOKEN), Some(r#"{"reason": "other"}"#)).await;
    assert_eq!((code, &again), (200, &p), "a second pause keeps the first");
    assert_eq!(http(port, "POST", "/api/pauses/galaxy/x", Some(TOKEN), None).await.0, 400);
    assert_eq!(http(port, "POST", "/api/pauses/lane/x", None, None).await.0, 401);
    let (code, lane) = http(port, "POST", "/api/pauses/lane/L", Some(TOKEN), None).await;
    assert_eq!((code, lane["reason"].is_null()), (200, true));

    env.submit(&[("wp_id", "nightly.a"), ("agent_id", "free")]).await;
    env.submit(&[("wp_id", "nightly.b"), ("agent_id", "free")]).await;
    env.submit(&[("wp_id", "in-lane"), ("agent_id", "free"), ("lane", "L")]).await;
    env.submit(&[("wp_id", "other.a"), ("agent_id", "free")]).await;
    eventually(T, "other.a dispatched", || async { env.triggers("free").await.iter().any(|t| t["wp_id"] == "other.a").then_some(()) })
        .await;
    waiting(&env, &["nightly.a", "nightly.b"], "paused: plan nightly (quota spent)").await;
    waiting(&env, &["in-lane"], "paused: lane L").await;
    let (code, list) = http(port, "GET", "/api/pauses", None, None).await;
    assert_eq!(code, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    // A new replica process: the pauses are in PostgreSQL, not in the replica.
    child.kill().await.unwrap();
    let (mut child, port) = env.serve_process("p2", &vars, None).await;
    env.submit(&[("wp_id", "other.b"), ("agent_id", "free")]).await;
    eventually(T, "other.b dispatched", || async { env.triggers("free").await.iter().any(|t| t["wp_id"] == "other.b").then_some(()) })
        .await;
    let sent: Vec<String> = env.triggers("free").await.into_iter().map(|t| t["wp_id"].clone()).collect();
    assert_eq!(sent, ["other.a", "other.b"], "nothing paused went");
    assert_eq!(env.status("nightly.a").await.as_deref(), Some("ready"));

    let (code, gone) = http(port, "DELETE", "/api/pauses/plan/nightly", Some(TOKEN), None).await;
    assert_eq!((code, gone["name"].as_str()), (200, Some("nightly")));
    assert_eq!(http(port, "DELETE", "/api/pauses/plan/nightly", Some(TOKEN), None).await.0, 404);
    eventually(T, "the plan's work dispatched", || async {
        let t = env.triggers("free").await;
        (t.iter().filter(|t| t["wp_id"].starts_with("nightly.")).count() == 2).then_some(())
    })
    .await;
    assert_eq!(env.status("in-lane").await.as_deref(), Some("ready"), "the lane is still paused");
    assert_eq!(http(port, "DELETE", "/api/pauses/lane/L", Some(TOKEN), None).await.0, 200);
    eventually(T, "the lane's work dispatched", || async { (env.status("in-lane").await.as_deref() == Some("dispatched")).then_some(()) })
        .await;
    child.kill().await.unwrap();
}

fn cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    // REDIS_URL (v1.6): a resume wakes the replicas' dispatch through Redis.
    Command::new(BIN).args(args).env("DATABASE_URL", &env.database_url).env("REDIS_URL", env.redis.url()).output().expect("run the CLI")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pauses_and_resumes_an_agent() {
    let env = TestEnv::start(SOLO).await;
    let replica = env.replica("r1");
    let out = cli(&env, &["pause", "agent", "free", "--reason", "vendor outage"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.submit(&[("wp_id", "held"), ("agent_id", "free")]).await;
    waiting(&env, &["held"], "paused: agent free (vendor outage)").await;
    let list = String::from_utf8_lossy(&cli(&env, &["pauses"]).stdout).into_owned();
    assert!(list.contains("agent free paused since") && list.contains("vendor outage"), "{list}");
    let bad = cli(&env, &["pause", "galaxy", "x"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("agent"), "clap names the scopes");
    assert!(env.triggers("free").await.is_empty());
    assert!(cli(&env, &["resume", "agent", "free"]).status.success());
    assert!(!cli(&env, &["resume", "agent", "free"]).status.success(), "nothing to resume twice");
    eventually(T, "held dispatched after the resume", || async { (env.triggers("free").await.len() == 1).then_some(()) }).await;
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_work_waits_for_its_time_and_holds_its_lane() {
    let env = TestEnv::start(SOLO).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "later"), ("agent_id", "free"), ("not_before", "2s")]).await;
    env.submit(&[("wp_id", "lane-1"), ("agent_id", "free"), ("lane", "D"), ("not_before", "2s")]).await;
    env.submit(&[("wp_id", "lane-2"), ("agent_id", "free"), ("lane", "D")]).await;
    env.submit(&[("wp_id", "now"), ("agent_id", "free")]).await;
    env.submit(&[("wp_id", "bad"), ("agent_id", "free"), ("not_before", "someday")]).await;
    eventually(T, "now dispatched", || async { env.triggers("free").await.iter().any(|t| t["wp_id"] == "now").then_some(()) }).await;
    waiting(&env, &["later", "lane-1"], "delayed: not before").await;
    assert_eq!(env.status("later").await.as_deref(), Some("retry_wait"));
    let dl = eventually(T, "bad dead-lettered", || async { env.deadletters().await.into_iter().next() }).await;
    assert!(dl.get("detail").is_some_and(|d| d.contains("not_before")), "{dl:?}");
    let lane1 =
        eventually(T, "lane-1 dispatched", || async { env.triggers("free").await.into_iter().find(|t| t["wp_id"] == "lane-1") }).await;
    assert_eq!(env.status("lane-2").await.as_deref(), Some("blocked"), "the lane waits for its delayed head");
    eventually(T, "later dispatched", || async { env.triggers("free").await.iter().any(|t| t["wp_id"] == "later").then_some(()) }).await;
    // Neither went before its time.
    let early: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE not_before IS NOT NULL AND dispatched_at < not_before")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(early, 0);
    env.complete(&lane1).await;
    eventually(T, "lane-2 dispatched", || async { env.triggers("free").await.iter().any(|t| t["wp_id"] == "lane-2").then_some(()) }).await;
    replica.stop().await;
}
