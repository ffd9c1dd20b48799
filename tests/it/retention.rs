//! Retention (contract v1.3): finished work leaves PostgreSQL after the retention period
//! unless open work still needs it; streams lose only what every reader is done with, and
//! trigger streams also what the operator's policy cuts; operators see the retention in force.

use std::time::Duration;

use ge_orchestrator::core::retention::{AgentPolicies, MaxLen, Period};
use ge_orchestrator::engine::settings::RunSettings;

use crate::harness::{BIN, ROUTING, T, TestEnv, eventually, http, http_get, http_settings, wait_ready};

/// Settings that remove finished work one second after it finished, checked five times a
/// second.
fn fast(mut s: RunSettings) -> RunSettings {
    s.retention.retention = Period(Some(Duration::from_secs(1)));
    s.retention.retention_floor = Duration::ZERO;
    s.retention.retention_interval = Duration::from_millis(200);
    s.republish_after = Duration::from_millis(500);
    s
}

async fn trigger_of(env: &TestEnv, agent: &str, wp: &str) -> std::collections::HashMap<String, String> {
    eventually(T, &format!("the trigger of {wp}"), || async { env.triggers(agent).await.into_iter().find(|t| t["wp_id"] == wp) }).await
}

async fn rows(env: &TestEnv, table: &str, wp: &str) -> i64 {
    let sql = match table {
        "events" => "SELECT count(*) FROM work_package_events WHERE wp_id = $1",
        "edges" => "SELECT count(*) FROM work_package_deps WHERE wp_id = $1",
        _ => "SELECT count(*) FROM work_packages WHERE wp_id = $1",
    };
    sqlx::query_scalar(sql).bind(wp).fetch_one(&env.pool).await.unwrap()
}

#[tokio::test]
async fn finished_work_is_removed_after_the_retention_but_not_what_open_work_still_needs() {
    let env = TestEnv::start(ROUTING).await;
    let replica = crate::harness::Replica::spawn(fast(env.settings("r1")));

    // Finished first, so a removal that ignored what they are kept for would take them first.
    // `needed` is a dependency of `waiter`, which also waits for a work package never sent.
    env.submit(&[("wp_id", "needed"), ("agent_id", "dolly")]).await;
    env.complete(&trigger_of(&env, "dolly", "needed").await).await;
    env.submit(&[("wp_id", "waiter"), ("agent_id", "dolly"), ("depends_on", "needed,not-sent")]).await;
    // `head` fails for good at the head of lane L; `next` waits behind it.
    env.submit(&[("wp_id", "head"), ("agent_id", "dolly"), ("lane", "L")]).await;
    env.fail(&trigger_of(&env, "dolly", "head").await, false).await;
    env.submit(&[("wp_id", "next"), ("agent_id", "dolly"), ("lane", "L")]).await;
    eventually(T, "head failed", || async { (env.status("head").await.as_deref() == Some("failed")).then_some(()) }).await;

    // A chain whose both ends finish: both go, with their edges and history.
    env.submit(&[("wp_id", "c1"), ("agent_id", "dolly")]).await;
    env.complete(&trigger_of(&env, "dolly", "c1").await).await;
    env.submit(&[("wp_id", "c2"), ("agent_id", "dolly"), ("depends_on", "c1")]).await;
    env.complete(&trigger_of(&env, "dolly", "c2").await).await;
    assert!(rows(&env, "edges", "c2").await == 1 && rows(&env, "events", "c2").await > 0);

    eventually(T, "c1 and c2 removed", || async { (env.status("c1").await.is_none() && env.status("c2").await.is_none()).then_some(()) })
        .await;
    assert_eq!((rows(&env, "events", "c2").await, rows(&env, "edges", "c2").await), (0, 0), "history and edges go with it");
    assert_eq!(env.status("needed").await.as_deref(), Some("completed"), "a dependency of waiting work stays");
    assert_eq!(env.status("head").await.as_deref(), Some("failed"), "a failed lane head with work behind it stays");
    assert_eq!(env.status("waiter").await.as_deref(), Some("blocked"));
    assert_eq!(env.status("next").await.as_deref(), Some("blocked"), "the lane still waits for its failed head");

    // Once an operator has resolved what needed them (cancelled, so retriable, until it is
    // removed in turn), they go too.
    ge_orchestrator::engine::store::cancel(&env.pool, "waiter").await.unwrap();
    ge_orchestrator::engine::store::cancel(&env.pool, "next").await.unwrap();
    ge_orchestrator::engine::store::cancel(&env.pool, "head").await.unwrap();
    eventually(T, "needed, head and what waited on them removed", || async {
        let gone = ["needed", "head", "waiter", "next"];
        let mut left = Vec::new();
        for wp in gone {
            if env.status(wp).await.is_some() {
                left.push(wp);
            }
        }
        left.is_empty().then_some(())
    })
    .await;

    // A wp_id sent again after its removal is new work: it runs again, from attempt 1.
    env.submit(&[("wp_id", "c1"), ("agent_id", "dolly")]).await;
    eventually(T, "c1 dispatched again", || async {
        (env.triggers("dolly").await.iter().filter(|t| t["wp_id"] == "c1").count() == 2).then_some(())
    })
    .await;
    // A late report of a removed work package is dead-lettered, saying why it may be unknown.
    env.report("ge:work:completed", &[("wp_id", "c2"), ("dispatch_id", "c2:1")]).await;
    let dl = eventually(T, "the late report dead-lettered", || async {
        env.deadletters().await.into_iter().find(|d| d.get("wp_id").map(String::as_str) == Some("c2"))
    })
    .await;
    assert_eq!(dl["reason"], "unknown_wp");
    assert!(dl["detail"].contains("GE_RETENTION"), "{}", dl["detail"]);
    replica.stop().await;
}

/// What retention may not remove, whatever the period: an unresolved failure holds its lane
/// until an operator acts, even with nothing behind it yet; and what a cancelled work package
/// depends on stays while it may be retried (until it is removed itself), so that the retry
/// runs.
#[tokio::test]
async fn retention_keeps_an_unresolved_failure_and_what_a_retry_needs() {
    let env = TestEnv::start(ROUTING).await;
    let mut s = fast(env.settings("r1"));
    s.retention.retention = Period(Some(Duration::from_secs(4)));
    let replica = crate::harness::Replica::spawn(s);

    // `lonely` fails for good in lane F, with nothing behind it.
    env.submit(&[("wp_id", "lonely"), ("agent_id", "dolly"), ("lane", "F")]).await;
    env.fail(&trigger_of(&env, "dolly", "lonely").await, false).await;
    // `dep` waits for `pre`, which completes, and for `other`, which runs.
    env.submit(&[("wp_id", "pre"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "other"), ("agent_id", "dolly")]).await;
    env.complete(&trigger_of(&env, "dolly", "pre").await).await;
    let other = trigger_of(&env, "dolly", "other").await;
    env.submit(&[("wp_id", "dep"), ("agent_id", "dolly"), ("depends_on", "pre,other")]).await;
    eventually(T, "lonely failed, pre completed, dep waiting", || async {
        let s = [env.status("lonely").await, env.status("pre").await, env.status("dep").await];
        (s == [Some("failed".into()), Some("completed".into()), Some("blocked".into())]).then_some(())
    })
    .await;
    // Past the retention of `pre` and `lonely`, `dep` is cancelled: now retriable, not open.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!ge_orchestrator::engine::store::cancel(&env.pool, "dep").await.unwrap().is_empty());
    // Several turns of retention later, well within the retention of `dep`.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.status("pre").await.as_deref(), Some("completed"), "a prerequisite of retriable work stays");
    assert_eq!(env.status("lonely").await.as_deref(), Some("failed"), "an unresolved failure stays");

    // The lane still waits for its failure.
    env.submit(&[("wp_id", "second"), ("agent_id", "dolly"), ("lane", "F")]).await;
    eventually(T, "second held", || async { (env.status("second").await.as_deref() == Some("blocked")).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!env.triggers("dolly").await.iter().any(|t| t["wp_id"] == "second"), "second ran past the failure of lonely");

    // The retry of `dep` finds `pre` completed, and runs once `other` completes.
    assert!(ge_orchestrator::engine::store::retry(&env.pool, "dep").await.unwrap(), "dep is still there to retry");
    env.complete(&other).await;
    trigger_of(&env, "dolly", "dep").await;
    // Once an operator resolves the failure (here: cancels it), the lane goes on.
    ge_orchestrator::engine::store::cancel(&env.pool, "lonely").await.unwrap();
    trigger_of(&env, "dolly", "second").await;
    replica.stop().await;
}

/// Adds `n` entries to `stream`; returns their ids.
async fn add(env: &TestEnv, stream: &str, n: usize) -> Vec<String> {
    let mut con = env.con.clone();
    let mut ids = Vec::new();
    for i in 0..n {
        let id: String = redis::cmd("XADD").arg(stream).arg("*").arg("n").arg(i).query_async(&mut con).await.unwrap();
        ids.push(id);
    }
    ids
}

async fn xlen(env: &TestEnv, stream: &str) -> u64 {
    let mut con = env.con.clone();
    redis::cmd("XLEN").arg(stream).query_async(&mut con).await.unwrap()
}

async fn exists(env: &TestEnv, stream: &str, id: &str) -> bool {
    let mut con = env.con.clone();
    let v: redis::Value = redis::cmd("XRANGE").arg(stream).arg(id).arg(id).query_async(&mut con).await.unwrap();
    !ge_orchestrator::engine::streams::parse_entries(&v).is_empty()
}

/// A second reader of the completed stream, with its own group: it reads the first `read`
/// entries and acknowledges all but the one at `keep`.
async fn audit_reads(env: &TestEnv, stream: &str, ids: &[String], read: usize, keep: usize) {
    let mut con = env.con.clone();
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg(stream).arg("audit").arg("0").arg("MKSTREAM").query_async(&mut con).await.unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("audit")
        .arg("a")
        .arg("COUNT")
        .arg(read)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();
    let acked: Vec<&String> = ids[..read].iter().enumerate().filter(|(i, _)| *i != keep).map(|(_, id)| id).collect();
    let _: u64 = redis::cmd("XACK").arg(stream).arg("audit").arg(&acked).query_async(&mut con).await.unwrap();
}

#[tokio::test]
async fn an_input_stream_is_trimmed_only_up_to_the_oldest_entry_a_group_still_holds() {
    let env = TestEnv::start(ROUTING).await;
    let stream = "ge:work:completed";
    // Reports of nothing: the orchestrator dead-letters and acknowledges each one.
    let ids = add(&env, stream, 400).await;
    // Another group has read 300 of them and still holds the 150th: its last-delivered id is
    // the 300th, so a trim to last-delivered ids would remove it.
    audit_reads(&env, stream, &ids, 300, 150).await;
    let replica = crate::harness::Replica::spawn(fast(env.settings("r1")));
    eventually(T, "the orchestrator acknowledged every report", || async { (env.pending().await == 0).then_some(()) }).await;
    eventually(T, "the stream trimmed", || async { (xlen(&env, stream).await < 400).then_some(()) }).await;
    // Several more turns of the trimmer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(exists(&env, stream, &ids[150]).await, "the entry another group still holds is kept");
    assert!(!exists(&env, stream, &ids[0]).await, "entries every group acknowledged are gone");
    let mut con = env.con.clone();
    let claimed: redis::Value =
        redis::cmd("XCLAIM").arg(stream).arg("audit").arg("b").arg(0).arg(&ids[150]).query_async(&mut con).await.unwrap();
    assert_eq!(ge_orchestrator::engine::streams::parse_entries(&claimed).len(), 1, "and can still be claimed with its content");

    // A group that never read holds everything.
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("ge:work:failed").arg("idle").arg("0").query_async(&mut con).await.unwrap();
    let fresh = add(&env, "ge:work:failed", 300).await;
    eventually(T, "the orchestrator acknowledged every failure report", || async { (env.pending().await == 0).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(exists(&env, "ge:work:failed", &fresh[0]).await, "a group that never read keeps the whole stream");
    replica.stop().await;
}

#[tokio::test]
async fn trigger_streams_lose_what_their_agent_acknowledged_and_unread_triggers_past_the_policy() {
    let env = TestEnv::start(ROUTING).await;
    let mut s = fast(env.settings("r1"));
    // dolly: no reader at all, at most 50 triggers kept; turing: read by its agent, no policy.
    s.retention.trigger_retention = AgentPolicies::parse("dolly=off/50,turing=off").unwrap();
    s.retention.trigger_max_len = MaxLen(None);
    s.retention.trigger_max_age = Period(None);
    let (s, port) = http_settings_of(&env, s);
    let replica = crate::harness::Replica::spawn(s);
    wait_ready(port).await;
    for i in 0..300 {
        env.submit(&[("wp_id", &format!("d{i}")), ("agent_id", "dolly")]).await;
    }
    eventually(T, "dolly's stream cut to its policy", || async {
        let dispatched: i64 =
            sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE status = 'dispatched'").fetch_one(&env.pool).await.unwrap();
        (dispatched == 300 && xlen(&env, "triggers.dolly").await < 200).then_some(())
    })
    .await;
    let (_, text) = http_get(port, "/metrics").await.expect("/metrics");
    let ratio = sample(&text, "ge_trigger_retention_used_ratio{agent=\"dolly\"}").expect("the ratio of dolly");
    assert!(ratio >= 0.8, "dolly is past its trim point: {ratio}");

    // turing's agent reads and acknowledges: its stream empties though it has no policy.
    let mut con = env.con.clone();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("triggers.turing")
        .arg("agent-turing")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await
        .unwrap();
    for i in 0..300 {
        env.submit(&[("wp_id", &format!("t{i}")), ("agent_id", "turing")]).await;
    }
    eventually(T, "turing's triggers", || async { (env.triggers("turing").await.len() >= 300).then_some(()) }).await;
    let before = xlen(&env, "triggers.turing").await;
    let read =
        ge_orchestrator::engine::streams::read_group(&mut con, "triggers.turing", "agent-turing", "t", 1000, None, ">").await.unwrap();
    let ids: Vec<String> = read.into_iter().map(|e| e.id).collect();
    assert_eq!(ids.len() as u64, before);
    let _: u64 =
        redis::cmd("XACK").arg("triggers.turing").arg("agent-turing").arg(&ids[..ids.len() - 1]).query_async(&mut con).await.unwrap();
    eventually(T, "turing's acknowledged triggers trimmed", || async { (xlen(&env, "triggers.turing").await < before / 2).then_some(()) })
        .await;
    assert!(exists(&env, "triggers.turing", ids.last().unwrap()).await, "the one it has not acknowledged stays");
    replica.stop().await;
}

fn http_settings_of(env: &TestEnv, s: RunSettings) -> (RunSettings, u16) {
    let (base, port) = http_settings(env, "r1", None);
    (RunSettings { http_addr: base.http_addr, ..s }, port)
}

/// The value of the sample named exactly `series` in a Prometheus exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn operators_see_the_retention_in_force_and_what_it_removes() {
    let env = TestEnv::start(ROUTING).await;
    let (s, port) = http_settings_of(&env, fast(env.settings("r1")));
    let replica = crate::harness::Replica::spawn(s);
    wait_ready(port).await;
    env.submit(&[("wp_id", "m1"), ("agent_id", "dolly")]).await;
    env.complete(&trigger_of(&env, "dolly", "m1").await).await;
    eventually(T, "m1 removed", || async { env.status("m1").await.is_none().then_some(()) }).await;

    let (_, overview) = http(port, "GET", "/api/overview", None, None).await;
    assert_eq!(overview["retention"]["work_packages"], "1s", "{overview}");
    assert_eq!(overview["retention"]["seconds"], 1);
    let (_, text) = http_get(port, "/metrics").await.expect("/metrics");
    assert_eq!(sample(&text, "ge_retention_seconds"), Some(1.0), "{text}");
    assert!(sample(&text, "ge_database_bytes").is_some_and(|b| b > 0.0));
    assert!(sample(&text, "ge_stream_length{stream=\"ge:work:incoming\"}").is_some());
    assert!(sample(&text, "ge_stream_trim_point_seconds{stream=\"ge:work:incoming\"}").is_some_and(|t| t > 1e9));
    assert!(sample(&text, "ge_retention_removed_rows_total{table=\"work_packages\"}").is_some_and(|n| n >= 1.0), "{text}");

    let out = std::process::Command::new(BIN)
        .args(["status", "--database-url", &env.database_url, "--redis-url", &env.redis.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("retention: finished work packages kept 1s"), "{stdout}");
    replica.stop().await;
}

#[tokio::test]
async fn a_retention_that_cannot_be_read_or_is_shorter_than_republication_is_refused() {
    let env = TestEnv::start(ROUTING).await;
    let mut s = env.settings("r1");
    s.retention.retention = Period(Some(Duration::from_secs(2)));
    s.republish_after = Duration::from_secs(5);
    let e = format!("{:#}", s.validate().unwrap_err());
    assert!(e.contains("--retention (GE_RETENTION)") && e.contains("--republish-after"), "{e}");
    // Below the floor (1 minute unless lowered) whatever else holds.
    let mut s = env.settings("r1");
    s.retention.retention = Period(Some(Duration::from_secs(30)));
    s.republish_after = Duration::from_secs(5);
    let e = format!("{:#}", s.validate().unwrap_err());
    assert!(e.contains("is shorter than --retention-floor (GE_RETENTION_FLOOR) (1m)") && !e.contains("--republish-after"), "{e}");
    s.retention.retention_floor = Duration::from_secs(30);
    s.validate().expect("a retention at its floor");
    let out = std::process::Command::new(BIN)
        .args(["run", "--http-addr", "off"])
        .env("REDIS_URL", env.redis.url())
        .env("DATABASE_URL", &env.database_url)
        .env("GE_RETENTION", "a week")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--retention") && stderr.contains("0 or off for never"), "{stderr}");
}
