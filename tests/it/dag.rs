//! Order: dependencies (fan-out, fan-in), lanes across two replicas, retries and the
//! operators' retry and cancel, agent capacity.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually};

async fn trigger_of(env: &TestEnv, wp: &str, attempt: u32) -> HashMap<String, String> {
    let dispatch_id = format!("{wp}:{attempt}");
    eventually(T, &format!("trigger {dispatch_id}"), || async {
        env.all_triggers().await.into_iter().find(|t| t["dispatch_id"] == dispatch_id)
    })
    .await
}

async fn wait_status(env: &TestEnv, wp: &str, status: &str) {
    eventually(T, &format!("{wp} {status}"), || async { (env.status(wp).await.as_deref() == Some(status)).then_some(()) }).await
}

async fn dispatched_ids(env: &TestEnv) -> HashSet<String> {
    env.all_triggers().await.into_iter().map(|t| t["wp_id"].clone()).collect()
}

#[tokio::test]
async fn fan_out_then_fan_in() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    // The join arrives first: a dependency on a wp_id not seen yet waits for it.
    env.submit(&[("wp_id", "join"), ("agent_id", "dolly"), ("depends_on", "a,b,c")]).await;
    for x in ["a", "b", "c"] {
        env.submit(&[("wp_id", x), ("work_type", "implement"), ("depends_on", "root")]).await;
    }
    env.submit(&[("wp_id", "root"), ("agent_id", "dolly")]).await;

    let root = trigger_of(&env, "root", 1).await;
    wait_status(&env, "a", "blocked").await;
    assert_eq!(dispatched_ids(&env).await, HashSet::from(["root".to_string()]), "only the root may run");
    env.complete(&root).await;

    let mut fanned = Vec::new();
    for x in ["a", "b", "c"] {
        fanned.push(trigger_of(&env, x, 1).await);
    }
    env.complete(&fanned[0]).await;
    env.complete(&fanned[1]).await;
    wait_status(&env, "b", "completed").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.status("join").await.as_deref(), Some("blocked"), "the join waits for every dependency");
    let view = ge_orchestrator::ops::reads::work_packages(&env.pool, Some("join"), 1).await.unwrap();
    assert!(view[0].why.contains("c (dispatched)"), "status says what it waits for: {}", view[0].why);
    env.complete(&fanned[2]).await;
    let join = trigger_of(&env, "join", 1).await;
    assert_eq!(join["agent_id"], "dolly");
    replica.stop().await;
}

/// Completes every trigger as soon as it appears, recording each lane's dispatch order and
/// failing if a lane ever has two work packages out at once.
async fn auto_agent(env: &TestEnv, expected: usize) -> HashMap<String, Vec<String>> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let start = std::time::Instant::now();
    while seen.len() < expected {
        assert!(start.elapsed() < Duration::from_secs(90), "only {} of {expected} dispatched", seen.len());
        let mut fresh: Vec<HashMap<String, String>> =
            env.all_triggers().await.into_iter().filter(|t| !seen.contains(&t["dispatch_id"])).collect();
        fresh.sort_by(|a, b| a["_id"].cmp(&b["_id"]));
        let mut lanes_out: HashSet<String> = HashSet::new();
        for t in &fresh {
            let lane = t.get("lane").cloned().unwrap_or_default();
            assert!(lanes_out.insert(lane.clone()), "two work packages of lane {lane} out at once: {fresh:?}");
            seen.insert(t["dispatch_id"].clone());
            order.entry(lane).or_default().push(t["wp_id"].clone());
        }
        for t in &fresh {
            env.complete(t).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    order
}

#[tokio::test]
async fn lanes_run_in_stream_order_with_two_replicas() {
    let env = TestEnv::start(ROUTING).await;
    // Small batches make the two replicas interleave within each lane.
    let mut s1 = env.settings("r1");
    s1.batch_size = 2;
    let mut s2 = env.settings("r2");
    s2.batch_size = 3;
    let r1 = Replica::spawn(s1);
    let r2 = Replica::spawn(s2);
    let lanes = ["l0", "l1", "l2", "l3"];
    let per_lane = 12;
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..per_lane {
        for (n, lane) in lanes.iter().enumerate() {
            let wp = format!("{lane}-{i:02}");
            let route = if n % 2 == 0 { ("work_type", "implement") } else { ("agent_id", "dolly") };
            env.submit(&[("wp_id", &wp), ("lane", lane), route]).await;
            expected.entry(lane.to_string()).or_default().push(wp);
        }
    }
    let order = auto_agent(&env, lanes.len() * per_lane).await;
    for lane in lanes {
        assert_eq!(order[lane], expected[lane], "lane {lane} ran out of order");
    }
    for wp in expected.values().flatten() {
        wait_status(&env, wp, "completed").await;
    }
    r1.stop().await;
    r2.stop().await;
}

const FAST_RETRY: &str = r#"version: 1
agents:
  dolly: { roles: [coordinator] }
  ada:   { roles: [developer] }
work_types:
  implement: developer
default_agent: dolly
retry: { max_attempts: 2, backoff: { initial: 2s, factor: 2, max: 4s } }
"#;

#[tokio::test]
async fn retries_with_backoff_then_fails_holding_dependents_until_an_operator_retries() {
    let env = TestEnv::start(FAST_RETRY).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "x"), ("work_type", "implement"), ("lane", "L")]).await;
    env.submit(&[("wp_id", "y"), ("work_type", "implement"), ("lane", "L")]).await;
    env.submit(&[("wp_id", "z"), ("work_type", "implement"), ("depends_on", "x")]).await;

    let x1 = trigger_of(&env, "x", 1).await;
    env.fail(&x1, true).await;
    wait_status(&env, "x", "retry_wait").await;
    let wait_ms: f64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM next_attempt_at - updated_at) * 1000)::float8 FROM work_packages WHERE wp_id = 'x'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    // Long enough that a loaded machine's poll still sees `retry_wait` before attempt 2 starts.
    assert!((1_900.0..=2_200.0).contains(&wait_ms), "first backoff is the initial 2s, got {wait_ms}");

    let x2 = trigger_of(&env, "x", 2).await;
    assert_eq!(x2["attempt"], "2");
    // A late report for the first attempt changes nothing.
    env.complete(&x1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.status("x").await.as_deref(), Some("dispatched"), "a completion for an older attempt is ignored");

    env.fail(&x2, true).await;
    wait_status(&env, "x", "failed").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let views = ge_orchestrator::ops::reads::work_packages(&env.pool, None, 10).await.unwrap();
    let why = |wp: &str| views.iter().find(|v| v.wp_id == wp).unwrap().why.clone();
    assert!(why("y").contains("lane L predecessor x (failed)"), "{}", why("y"));
    assert!(why("z").contains("x (failed)"), "{}", why("z"));
    assert!(why("x").contains("failed after 2"), "{}", why("x"));
    assert!(!dispatched_ids(&env).await.contains("y"));

    assert!(ge_orchestrator::engine::store::retry(&env.pool, "x").await.unwrap());
    let x3 = trigger_of(&env, "x", 3).await;
    env.complete(&x3).await;
    trigger_of(&env, "y", 1).await;
    trigger_of(&env, "z", 1).await;
    env.assert_in_flight_consistent().await;
    replica.stop().await;
}

#[tokio::test]
async fn cancel_cascades_to_dependents_and_frees_the_lane() {
    let env = TestEnv::start(FAST_RETRY).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "p"), ("work_type", "implement"), ("lane", "M")]).await;
    env.submit(&[("wp_id", "q"), ("work_type", "implement"), ("depends_on", "p")]).await;
    env.submit(&[("wp_id", "q2"), ("work_type", "implement"), ("depends_on", "q")]).await;
    env.submit(&[("wp_id", "r"), ("work_type", "implement"), ("lane", "M")]).await;
    let p1 = trigger_of(&env, "p", 1).await;
    env.fail(&p1, false).await;
    wait_status(&env, "p", "failed").await;
    assert_eq!(env.status("r").await.as_deref(), Some("blocked"), "the lane waits behind a failed work package");

    let mut cancelled = ge_orchestrator::engine::store::cancel(&env.pool, "p").await.unwrap();
    cancelled.sort();
    assert_eq!(cancelled, vec!["p", "q", "q2"]);
    trigger_of(&env, "r", 1).await;
    assert!(!dispatched_ids(&env).await.contains("q"), "cancelled dependents never run");
    env.assert_in_flight_consistent().await;
    // Cancelling work in flight frees its agent's slot.
    ge_orchestrator::engine::store::cancel(&env.pool, "r").await.unwrap();
    env.assert_in_flight_consistent().await;
    replica.stop().await;
}

const CAPPED: &str = r#"version: 1
agents:
  ada:    { roles: [developer], max_in_flight: 2 }
  hopper: { roles: [ops], enabled: false }
work_types:
  implement: developer
"#;

#[tokio::test]
async fn max_in_flight_is_a_hard_cap_and_disabled_agents_get_nothing() {
    let env = TestEnv::start(CAPPED).await;
    let r1 = env.replica("r1");
    let r2 = env.replica("r2");
    for i in 0..5 {
        env.submit(&[("wp_id", &format!("w{i}")), ("work_type", "implement")]).await;
    }
    env.submit(&[("wp_id", "h"), ("agent_id", "hopper")]).await;
    eventually(T, "two dispatched", || async { (env.triggers("ada").await.len() == 2).then_some(()) }).await;
    wait_status(&env, "h", "ready").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.triggers("ada").await.len(), 2, "never more than max_in_flight out");
    assert!(env.triggers("hopper").await.is_empty(), "a disabled agent gets nothing");
    let views = ge_orchestrator::ops::reads::work_packages(&env.pool, None, 10).await.unwrap();
    let w4 = views.iter().find(|v| v.wp_id == "w4").unwrap();
    assert_eq!(w4.status, "ready");
    assert!(w4.why.contains("ada"), "says which agent is full: {}", w4.why);
    let h = views.iter().find(|v| v.wp_id == "h").unwrap();
    assert!(h.why.contains("disabled"), "says the agent is disabled: {}", h.why);

    // Completing one frees exactly one slot.
    let first = env.triggers("ada").await.remove(0);
    env.complete(&first).await;
    eventually(T, "third dispatched", || async { (env.triggers("ada").await.len() == 3).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.triggers("ada").await.len(), 3);
    env.assert_in_flight_consistent().await;
    r1.stop().await;
    r2.stop().await;
}

/// Batches that cannot close a cycle are ingested side by side; one that might is checked
/// against everything committed before it. Pairs that depend on each other, sent to two
/// replicas reading one entry at a time, must each lose exactly one member as a cycle.
#[tokio::test]
async fn mutual_dependencies_across_two_replicas_refuse_one_of_each_pair() {
    let env = TestEnv::start(ROUTING).await;
    let mut replicas = Vec::new();
    for name in ["r1", "r2"] {
        let mut s = env.settings(name);
        s.batch_size = 1;
        replicas.push(Replica::spawn(s));
    }
    let pairs = 40;
    for i in 0..pairs {
        env.submit(&[("wp_id", &format!("a{i}")), ("agent_id", "dolly"), ("depends_on", &format!("b{i}"))]).await;
        env.submit(&[("wp_id", &format!("b{i}")), ("agent_id", "dolly"), ("depends_on", &format!("a{i}"))]).await;
    }
    let cycles: HashSet<String> = eventually(T, "a cycle refused in every pair", || async {
        let c: HashSet<String> =
            env.deadletters().await.into_iter().filter(|d| d["reason"] == "cycle").map(|d| d["wp_id"].clone()).collect();
        (c.len() >= pairs).then_some(c)
    })
    .await;
    eventually(T, "every entry handled", || async { (env.pending().await == 0).then_some(()) }).await;
    // Which one closes the cycle depends on which replica gets there first.
    for i in 0..pairs {
        let (a, b) = (format!("a{i}"), format!("b{i}"));
        let stored = [env.status(&a).await.is_some(), env.status(&b).await.is_some()];
        assert_eq!(stored.iter().filter(|s| **s).count(), 1, "pair {i}: exactly one of {a}, {b} is stored: {stored:?}");
        let refused = if stored[0] { &b } else { &a };
        assert!(cycles.contains(refused), "pair {i}: {refused} dead-lettered as a cycle");
    }
    for r in replicas {
        r.stop().await;
    }
}

/// The scheduler's sweep looks at blocked work a page at a time, from where the last sweep
/// stopped: work that became free to run without an event this replica saw (here, its
/// dependency appears as completed straight in PostgreSQL, its count of unmet prerequisites
/// zero, as when another replica's dispatch after a completion failed) is found even behind
/// more blocked work than one round looks at (a lane whose head waits for ever).
#[tokio::test]
async fn the_sweep_reaches_work_behind_a_backlog_larger_than_a_round() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "head"), ("agent_id", "dolly"), ("lane", "long"), ("depends_on", "never")]).await;
    for i in 0..1_200 {
        env.submit(&[("wp_id", &format!("waits-{i}")), ("agent_id", "dolly"), ("lane", "long")]).await;
    }
    env.submit(&[("wp_id", "late"), ("agent_id", "dolly"), ("depends_on", "elsewhere")]).await;
    wait_status(&env, "late", "blocked").await;
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO work_packages (wp_id, status, fields, source_id, source_ms, source_seq, completed_at)
         VALUES ('elsewhere', 'completed', '{}', '0-1', 0, 1, now())",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("UPDATE work_packages SET unmet_deps = 0 WHERE wp_id = 'late'").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let late = trigger_of(&env, "late", 1).await;
    assert_eq!(late["agent_id"], "dolly");
    assert_eq!(env.status("waits-0").await.as_deref(), Some("blocked"), "what still waits is left waiting");
    replica.stop().await;
}

/// The completion of a last prerequisite claims, in its own transaction, the dependents that
/// may run at once (an agent without a cap, no lane, nothing paused): their `dispatched_at` is
/// the completion's own transaction time. A dependent of a capped agent, or of a paused plan,
/// is left to a round, which dispatches the first and records why the second waits. So goes
/// the next member of a lane, behind the lane gate (`dispatch::at_once::LaneGate`).
#[tokio::test]
async fn the_completion_of_a_last_prerequisite_claims_what_may_run_at_once() {
    use ge_orchestrator::engine::controls::{self, PauseScope};
    let env = TestEnv::start(ROUTING).await;
    controls::pause(&env.pool, PauseScope::Plan, "held", None).await.unwrap();
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "first"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "other"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "free"), ("agent_id", "dolly"), ("depends_on", "first,other")]).await;
    env.submit(&[("wp_id", "review"), ("work_type", "code_review"), ("depends_on", "first,other")]).await;
    env.submit(&[("wp_id", "capped"), ("agent_id", "ada"), ("depends_on", "first,other")]).await;
    env.submit(&[("wp_id", "paused"), ("agent_id", "dolly"), ("plan", "held"), ("depends_on", "first,other")]).await;
    env.submit(&[("wp_id", "lane-a"), ("agent_id", "dolly"), ("lane", "l")]).await;
    env.submit(&[("wp_id", "lane-b"), ("agent_id", "dolly"), ("lane", "l")]).await;
    let lane_a = trigger_of(&env, "lane-a", 1).await;
    env.complete(&lane_a).await;
    trigger_of(&env, "lane-b", 1).await;
    let (next_at_once,): (bool,) = sqlx::query_as(
        "SELECT b.dispatched_at = a.completed_at FROM work_packages a, work_packages b WHERE a.wp_id = 'lane-a' AND b.wp_id = 'lane-b'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(next_at_once, "a lane's next member, its entry long delivered and acknowledged, goes with the completion");
    let first = trigger_of(&env, "first", 1).await;
    let other = trigger_of(&env, "other", 1).await;
    env.complete(&first).await;
    wait_status(&env, "first", "completed").await;
    env.complete(&other).await;
    for wp in ["free", "review", "capped"] {
        trigger_of(&env, wp, 1).await;
    }
    wait_status(&env, "paused", "ready").await;

    let at = |wp: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT w.dispatched_at = p.completed_at FROM work_packages w, work_packages p WHERE w.wp_id = $1 AND p.wp_id = 'other'",
            )
            .bind(wp)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(at("free").await, "claimed by the transaction that completed its last prerequisite");
    assert!(at("review").await, "a role with one unlimited agent too");
    assert!(!at("capped").await, "a capped agent's work goes through a round");
    let (reason,): (Option<String>,) =
        sqlx::query_as("SELECT wait_reason FROM work_packages WHERE wp_id = 'paused'").fetch_one(&env.pool).await.unwrap();
    assert!(reason.as_deref().is_some_and(|r| r.contains("paused")), "the round says why it waits: {reason:?}");
    let history: Vec<String> =
        sqlx::query_scalar("SELECT status FROM work_package_events WHERE wp_id = 'free' ORDER BY id").fetch_all(&env.pool).await.unwrap();
    assert_eq!(history, ["blocked", "dispatched"]);
    env.assert_in_flight_consistent().await;
    replica.stop().await;
}

/// A claim skips a row another transaction has locked; the ingest of a dependent locks its
/// prerequisites `FOR SHARE` for the length of its transaction. A work package whose claim met
/// such a lock is tried again shortly after by the same round, not left to the sweep (here an
/// hour away): once the lock is released, it goes. `witness` goes in the same round's claim,
/// so its trigger says the claim has met the lock.
#[tokio::test]
async fn a_claim_that_met_a_dependent_s_ingest_lock_is_tried_again() {
    use ge_orchestrator::engine::controls::{self, PauseScope};
    let env = TestEnv::start(ROUTING).await;
    let mut settings = env.settings("r1");
    settings.scheduler_interval = Duration::from_secs(3600);
    let replica = Replica::spawn(settings);
    controls::pause(&env.pool, PauseScope::Agent, "dolly", None).await.unwrap();
    env.submit(&[("wp_id", "locked"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "witness"), ("agent_id", "dolly")]).await;
    wait_status(&env, "locked", "ready").await;
    wait_status(&env, "witness", "ready").await;
    // What the ingest of a step after `locked` holds while it counts its prerequisites.
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM work_packages WHERE wp_id = 'locked' FOR SHARE").execute(&mut *holder).await.unwrap();
    let out = crate::operations::cli(&env, &["resume", "agent", "dolly"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    trigger_of(&env, "witness", 1).await;
    assert_eq!(env.status("locked").await.as_deref(), Some("ready"), "the claim skipped the locked row");
    holder.rollback().await.unwrap();
    trigger_of(&env, "locked", 1).await;
    replica.stop().await;
}
