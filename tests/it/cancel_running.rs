//! Cancel of running work (contract v1.6): the reference agent hears of it while its command
//! runs, kills the command's process group and reports nothing; the slot is free for the
//! agent's next work; a report that comes anyway is recorded and ignored; dependents are
//! cancelled with it; `cancel --plan` reaches every open work package of a plan.

use std::path::Path;
use std::process::Stdio;

use crate::harness::{BIN, ROUTING, T, TestEnv, eventually, http};
use crate::operations::{cli, sweepless_replica};

const TOKEN: &str = "door-token";

/// `solo` takes one work package at a time.
fn routing() -> String {
    ROUTING.replace("agents:\n", "agents:\n  solo:   { roles: [solo], max_in_flight: 1 }\n")
}

/// The reference agent for `name`, whose command starts a child in its process group, writes
/// both pids, and sleeps.
fn agent(env: &TestEnv, name: &str, dir: &Path) -> tokio::process::Child {
    let script = format!("sleep 300 & echo $! > {d}/$GE_WP_ID.child; echo $$ > {d}/$GE_WP_ID.pid; wait", d = dir.display());
    let log = std::fs::File::create(dir.join(format!("agent-{name}.log"))).unwrap();
    tokio::process::Command::new(BIN)
        .args(["agent", name, "--", "sh", "-c", &script])
        .env("REDIS_URL", env.redis.url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent")
}

/// Whether the process lives (a zombie does not count).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

async fn pid_of(dir: &Path, file: &str) -> i32 {
    eventually(T, &format!("{file} written"), || async { std::fs::read_to_string(dir.join(file)).ok().and_then(|s| s.trim().parse().ok()) })
        .await
}

async fn status_is(env: &TestEnv, wp: &str, status: &str) {
    eventually(T, &format!("{wp} {status}"), || async { (env.status(wp).await.as_deref() == Some(status)).then_some(()) }).await;
}

async fn history(env: &TestEnv, wp: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT status, detail FROM work_package_events WHERE wp_id = $1 ORDER BY id")
        .bind(wp)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_command_is_killed_its_slot_freed_and_a_late_report_ignored() {
    let env = TestEnv::start(&routing()).await;
    let (replica, _port) = sweepless_replica(&env, "cancel-1").await;
    let dir = env.dir.path().join("pids");
    std::fs::create_dir(&dir).unwrap();
    let mut agent = agent(&env, "solo", &dir);
    env.submit(&[("wp_id", "run-1"), ("agent_id", "solo")]).await;
    env.submit(&[("wp_id", "run-2"), ("agent_id", "solo")]).await;
    env.submit(&[("wp_id", "after-1"), ("agent_id", "dolly"), ("depends_on", "run-1")]).await;
    let (pid, child) = (pid_of(&dir, "run-1.pid").await, pid_of(&dir, "run-1.child").await);
    assert!(alive(pid) && alive(child));
    // solo's one slot is taken: run-2 waits for it.
    status_is(&env, "run-2", "ready").await;

    let asked = std::time::Instant::now();
    let out = cli(&env, &["cancel", "run-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("after-1") && said.contains("stopped while running") && said.contains("run-1"), "{said}");
    eventually(T, "the command and its child killed", || async { (!alive(pid) && !alive(child)).then_some(()) }).await;
    // A measurement, not an assertion (timing goals belong in the bench).
    println!("from `cancel` (a CLI process) to the command's process group killed: {:?}", asked.elapsed());
    assert_eq!(env.status("after-1").await.as_deref(), Some("cancelled"));
    // The slot is free: solo's next work goes, and the agent runs it.
    pid_of(&dir, "run-2.pid").await;
    assert_eq!(env.status("run-1").await.as_deref(), Some("cancelled"));
    let reports: Vec<_> = [env.entries("ge:work:completed").await, env.entries("ge:work:failed").await].concat();
    assert!(reports.iter().all(|r| r["wp_id"] != "run-1"), "the agent reports nothing for a cancelled dispatch: {reports:?}");
    env.assert_in_flight_consistent().await;

    // A report that arrives anyway is recorded in the history and changes nothing.
    env.report("ge:work:completed", &[("wp_id", "run-1"), ("dispatch_id", "run-1:1"), ("result", "late")]).await;
    eventually(T, "the late report in the history", || async {
        history(&env, "run-1").await.into_iter().find(|(_, d)| d.as_deref().is_some_and(|d| d.contains("arrived after the cancel")))
    })
    .await;
    assert_eq!(env.status("run-1").await.as_deref(), Some("cancelled"));
    let _ = agent.kill().await;
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_is_cancelled_whole_and_its_running_agents_are_told() {
    let env = TestEnv::start(&routing()).await;
    let (replica, port) = sweepless_replica(&env, "cancel-2").await;
    env.submit(&[("wp_id", "night.a"), ("agent_id", "solo")]).await;
    env.submit(&[("wp_id", "night.b"), ("agent_id", "solo")]).await;
    env.submit(&[("wp_id", "night.c"), ("agent_id", "dolly"), ("depends_on", "night.a")]).await;
    env.submit(&[("wp_id", "later.x"), ("agent_id", "dolly"), ("depends_on", "night.b")]).await;
    env.submit(&[("wp_id", "day.y"), ("agent_id", "dolly")]).await;
    status_is(&env, "night.a", "dispatched").await;
    status_is(&env, "day.y", "dispatched").await;

    assert_eq!(http(port, "POST", "/api/plans/night/cancel", None, None).await.0, 401);
    let (code, v) = http(port, "POST", "/api/plans/night/cancel", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["cancelled"], serde_json::json!(["later.x", "night.a", "night.b", "night.c"]));
    assert_eq!(v["running"], serde_json::json!(["night.a"]));
    let notices = env.entries("cancels.solo").await;
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!((notices[0]["wp_id"].as_str(), notices[0]["dispatch_id"].as_str()), ("night.a", "night.a:1"));
    assert_eq!(env.status("day.y").await.as_deref(), Some("dispatched"), "another plan is untouched");
    let (code, v) = http(port, "POST", "/api/plans/night/cancel", Some(TOKEN), None).await;
    assert_eq!(code, 409, "nothing left to cancel: {v}");
    replica.stop().await;
}

/// A dependent that arrives after its dependency was cancelled is cancelled as it arrives, with
/// what depends on it in the same batch: cancellation reaches dependents whenever they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_submitted_after_the_cancel_is_cancelled_too() {
    let env = TestEnv::start(&routing()).await;
    let (replica, _port) = sweepless_replica(&env, "cancel-3").await;
    env.submit(&[("wp_id", "early"), ("agent_id", "solo")]).await;
    status_is(&env, "early", "dispatched").await;
    assert!(cli(&env, &["cancel", "early"]).status.success());
    env.submit(&[("wp_id", "late"), ("agent_id", "dolly"), ("depends_on", "early")]).await;
    env.submit(&[("wp_id", "later"), ("agent_id", "dolly"), ("depends_on", "late")]).await;
    status_is(&env, "late", "cancelled").await;
    status_is(&env, "later", "cancelled").await;
    let why: Option<String> =
        sqlx::query_scalar("SELECT wait_reason FROM work_packages WHERE wp_id = 'late'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(why.as_deref(), Some("cancelled because early was cancelled"));
    replica.stop().await;
}
