//! The dashboard end to end in headless Chromium: a running stack (a replica serving the
//! dashboard, reference agents as processes, the sample plan), then `tests/browser/dashboard.mjs`
//! (playwright-core) checks the DAG's statuses and swimlanes, what blocked work waits for,
//! the agents and replicas panels, and requeues a dead letter from the UI after a routing fix
//! and a reload, until it completes. Then a big plan (8 lanes of 25 steps, each lane at a
//! different point, one failed): the view opens on its frontier with finished stretches folded,
//! shows each lane's progress, sums up what waits, and pauses and resumes a lane, an agent and
//! the plan. Last, the schedules section (v1.6): next firings, a paused schedule, and a pause and
//! resume from the page.
//! The test plays the big plan's agent itself, so each lane stops where it should. The replica
//! has a read token, which the page asks for before it shows anything. Screenshots go to
//! `$GE_SCREENSHOTS` (the docs use `GE_SCREENSHOTS=docs/screenshots`), else to a temporary
//! directory.

#[path = "it/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ge_orchestrator::tools::plan::Plan;
use harness::{BIN, ROUTING, Replica, T, TestEnv, eventually, http_settings, wait_ready};

const TOKEN: &str = "browser-test-token";
const READ_TOKEN: &str = "browser-read-token";

fn agent(env: &TestEnv, name: &str) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        // (v1.6) Each run costs 0.25 USD and some tokens, so that spend shows.
        .args([
            "agent",
            name,
            "--",
            "sh",
            "-c",
            "sleep 0.2; printf 'cost=0.25\\ninput_tokens=1000\\noutput_tokens=200\\n' > \"$GE_USAGE_FILE\"; echo ok",
        ])
        .env("REDIS_URL", env.redis.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start a reference agent")
}

/// The big plan: lanes `l0`..`l7` of 25 steps, all on agent `bigco`, which this test plays.
const LANES: usize = 8;
const STEPS: usize = 25;
/// Steps each lane completes before the browser looks; lane 5's next step then fails for good.
const PROGRESS: [usize; LANES] = [20, 12, 3, 0, 25, 5, 16, 8];
const FAILING_LANE: usize = 5;
/// The lane the browser pauses: its running step completes when the browser asks (a file
/// `release-l2` in the shared directory), and its next step must then wait for the resume.
const PAUSED_LANE: usize = 2;

fn big_wp(lane: usize, step: usize) -> String {
    format!("big.l{lane}-s{step:02}")
}

/// Agent `bigco`: completes each lane's steps up to its PROGRESS, fails lane 5's next step,
/// holds every other trigger, and completes one held step of a lane each time the browser
/// drops a `release-LANE` file into `dir`.
async fn play_bigco(env: Arc<TestEnv>, dir: PathBuf) {
    let mut done = HashSet::new();
    loop {
        for t in env.triggers("bigco").await {
            let wp = t["wp_id"].clone();
            let Some((lane, step)) = wp.strip_prefix("big.l").and_then(|r| r.split_once("-s")) else { continue };
            let (lane, step): (usize, usize) = (lane.parse().unwrap(), step.parse().unwrap());
            if done.contains(&t["dispatch_id"]) {
                continue;
            }
            let release = dir.join(format!("release-l{lane}"));
            if step < PROGRESS[lane] {
                env.complete(&t).await;
            } else if lane == FAILING_LANE && step == PROGRESS[lane] {
                env.fail(&t, false).await;
            } else if std::fs::remove_file(&release).is_ok() {
                env.complete(&t).await;
            } else {
                continue;
            }
            done.insert(t["dispatch_id"].clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_plan_and_requeues_a_dead_letter() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir() && Path::new("/usr/bin/chromium").exists(),
        "the browser test needs playwright-core in tests/browser/node_modules and /usr/bin/chromium: run scripts/setup.sh"
    );

    let routing = ROUTING.replace("agents:\n", "agents:\n  bigco:  { roles: [big] }\n");
    let env = Arc::new(TestEnv::start(&routing).await);
    let (mut settings, port) = http_settings(&env, "replica-1", Some(TOKEN));
    // Reads need a token too: the dashboard must send the one pasted in its header.
    settings.admin_read_token = Some(READ_TOKEN.into());
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    let _agents: Vec<_> = ["dolly", "ada", "turing", "ghost"].iter().map(|a| agent(&env, a)).collect();

    let plan = Plan::load(&root.join("examples/plan.yaml")).expect("the sample plan").with_prefix("e2e.");
    let mut con = env.con.clone();
    ge_orchestrator::tools::plan::submit(&mut con, "ge:work:incoming", &plan).await.expect("submit the plan");
    // Held: hopper is disabled, so `held` waits as ready and `after-held` is blocked on it.
    env.submit(&[("wp_id", "e2e.held"), ("agent_id", "hopper"), ("lane", "ops")]).await;
    env.submit(&[("wp_id", "e2e.after-held"), ("agent_id", "dolly"), ("lane", "ops")]).await;
    env.submit(&[("wp_id", "e2e.unblocked-later"), ("agent_id", "dolly"), ("depends_on", "e2e.held")]).await;
    // (v1.6) A step that waits for an approval, which the browser gives.
    // A plan of its own, so the sample plan's waiting list stays as it is.
    env.submit(&[("wp_id", "gate"), ("plan", "approvals"), ("wait_for", "approval")]).await;
    env.submit(&[("wp_id", "after-gate"), ("plan", "approvals"), ("agent_id", "dolly"), ("depends_on", "gate")]).await;
    // Broken routing: ghost is not in the registry, so this is dead-lettered.
    env.submit(&[("wp_id", "e2e.hotfix"), ("agent_id", "ghost"), ("depends_on", "e2e.spec")]).await;

    let ids = plan.wp_ids();
    eventually(T, "the sample plan completed", || async {
        for id in &ids {
            if env.status(id).await.as_deref() != Some("completed") {
                return None;
            }
        }
        Some(())
    })
    .await;
    eventually(T, "the dead letter", || async { (!env.deadletters().await.is_empty()).then_some(()) }).await;

    // The big plan, submitted step by step across the lanes, as a planner would.
    let shared = env.dir.path().join("browser-shared");
    std::fs::create_dir_all(&shared).unwrap();
    for step in 0..STEPS {
        for lane in 0..LANES {
            env.submit(&[("wp_id", &big_wp(lane, step)), ("agent_id", "bigco"), ("lane", &format!("l{lane}"))]).await;
        }
    }
    let bigco = tokio::spawn(play_bigco(env.clone(), shared.clone()));
    let expected_done: usize = PROGRESS.iter().sum();
    eventually(T, "each lane of the big plan where it should be", || async {
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM work_packages WHERE wp_id LIKE 'big.%' GROUP BY status ORDER BY status")
                .fetch_all(&env.pool)
                .await
                .unwrap();
        let running = PROGRESS.iter().enumerate().filter(|&(l, &p)| p < STEPS && l != FAILING_LANE).count();
        let want = vec![
            ("blocked".to_string(), (LANES * STEPS - expected_done - running - 1) as i64),
            ("completed".to_string(), expected_done as i64),
            ("dispatched".to_string(), running as i64),
            ("failed".to_string(), 1),
        ];
        (counts == want).then_some(())
    })
    .await;
    let frontier: Vec<String> = (0..LANES).filter(|&l| PROGRESS[l] < STEPS).map(|l| big_wp(l, PROGRESS[l])).collect();
    // (v1.6) The progress of a running step, as its agent would report it on a heartbeat.
    let running = big_wp(0, PROGRESS[0]);
    env.report(
        "ge:work:heartbeat",
        &[("wp_id", &running), ("dispatch_id", &format!("{running}:1")), ("progress", "halfway there"), ("progress_fraction", "0.5")],
    )
    .await;
    eventually(T, "the progress recorded", || async {
        sqlx::query_scalar::<_, String>("SELECT text FROM work_package_progress WHERE wp_id = $1")
            .bind(&running)
            .fetch_optional(&env.pool)
            .await
            .unwrap()
    })
    .await;

    let mut expect: serde_json::Map<String, serde_json::Value> = ids.iter().map(|id| (id.clone(), "completed".into())).collect();
    expect.insert("e2e.held".into(), "ready".into());
    expect.insert("e2e.after-held".into(), "blocked".into());
    expect.insert("e2e.unblocked-later".into(), "blocked".into());
    let shots = std::env::var("GE_SCREENSHOTS").map(|d| root.join(d)).unwrap_or_else(|_| env.dir.path().join("screenshots"));
    let spec = serde_json::json!({
        "token": TOKEN,
        "read_token": READ_TOKEN,
        "expect": expect,
        "blocked": { "e2e.after-held": "e2e.held", "e2e.unblocked-later": "e2e.held", "e2e.held": "hopper" },
        "requeue": "e2e.hotfix",
        "approve": { "wp": "gate", "by": "browser", "comment": "looks good" },
        "progress": { "wp": running, "text": "halfway there" },
        "screenshots": shots,
        "big": {
            "plan": "big",
            "lanes": (0..LANES).map(|l| serde_json::json!({
                "lane": format!("l{l}"), "done": PROGRESS[l], "total": STEPS,
            })).collect::<Vec<_>>(),
            "frontier": frontier,
            "failed": big_wp(FAILING_LANE, PROGRESS[FAILING_LANE]),
            "pause_lane": format!("l{PAUSED_LANE}"),
            "after_pause": big_wp(PAUSED_LANE, PROGRESS[PAUSED_LANE] + 1),
            "pause_agent": "turing",
            "shared": shared,
        },
        // (v1.6) A running step of lane 7 is cancelled from the page, and the requeued dead
        // letter, completed by then, is rerun.
        "ops": {
            "cancel_plan": "big", "cancel": big_wp(7, PROGRESS[7]), "next": big_wp(7, PROGRESS[7] + 1),
            "rerun_plan": "e2e", "rerun": "e2e.hotfix", "screenshots": shots,
        },
        // (v1.6) The sample plan's spend, and a budget set from the page below it.
        "spend": { "plan": "e2e", "agent": "dolly", "budget": "0.50" },
    });

    // Schedules (v1.6) that do not fire while the test runs: one at 02:00 in Berlin, one paused.
    let scheduled = std::fs::read_to_string(root.join("examples/scheduled.yaml")).expect("the sample scheduled plan");
    let define = |cron: &str, paused| ge_orchestrator::engine::schedule_store::Definition {
        cron: cron.into(),
        timezone: "Europe/Berlin".into(),
        plan: scheduled.clone(),
        plan_source: Some("examples/scheduled.yaml".into()),
        missed: "catch_up:1".into(),
        overlap: "skip".into(),
        paused,
    };
    ge_orchestrator::engine::schedule_store::put(&env.pool, "nightly", &define("0 2 * * *", false), false).await.expect("add nightly");
    ge_orchestrator::engine::schedule_store::put(&env.pool, "weekly", &define("0 6 * * MON", true), false).await.expect("add weekly");
    let next = ge_orchestrator::engine::schedule_store::list(&env.pool).await.unwrap()[0].next_firing.expect("nightly's next firing");
    let mut spec = spec;
    spec["schedules"] = serde_json::json!({
        "name": "nightly",
        "paused": "weekly",
        "next": next.format("%Y-%m-%d %H:%M:%S").to_string(),
        "screenshots": shots,
    });

    // The fix, on disk; the browser presses "reload routing" before it requeues.
    env.write_routing(&routing.replace("agents:\n", "agents:\n  ghost:  { roles: [ops] }\n"));

    let out = tokio::process::Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .arg(spec.to_string())
        .current_dir(&browser_dir)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), out).await.expect("the browser test finished in time").expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert_eq!(env.status("e2e.hotfix").await.as_deref(), Some("completed"));
    let decided: Option<String> =
        sqlx::query_scalar("SELECT detail FROM work_package_events WHERE wp_id = 'gate' AND status = 'completed'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(decided.as_deref(), Some("approved by browser: looks good"));
    assert!(shots.join("dashboard-approval.png").exists());
    eventually(T, "the approved step's dependent completed", || async { env.status("after-gate").await.filter(|s| s == "completed") })
        .await;
    assert!(shots.join("dashboard.png").exists() && shots.join("dashboard-requeued.png").exists());
    assert!(shots.join("dashboard-big-plan.png").exists() && shots.join("dashboard-paused.png").exists());
    assert!(shots.join("dashboard-cancelled.png").exists() && shots.join("dashboard-rerun.png").exists());
    assert_eq!(env.status(&big_wp(7, PROGRESS[7])).await.as_deref(), Some("cancelled"));
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM work_packages WHERE wp_id = 'e2e.hotfix'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(attempts, 2, "the rerun ran as a second attempt");
    assert!(shots.join("dashboard-schedules.png").exists());
    assert!(shots.join("dashboard-spend.png").exists());
    let limit: String =
        sqlx::query_scalar("SELECT ge_usd(limit_usd) FROM plan_budgets WHERE plan = 'e2e'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(limit, "0.50", "the budget set from the page");
    // The paused lane's step went once it was resumed, and not before: the browser saw it wait.
    assert_eq!(env.status(&big_wp(PAUSED_LANE, PROGRESS[PAUSED_LANE])).await.as_deref(), Some("completed"));
    assert_eq!(env.status(&big_wp(PAUSED_LANE, PROGRESS[PAUSED_LANE] + 1)).await.as_deref(), Some("dispatched"));
    bigco.abort();
    replica.stop().await;
}
