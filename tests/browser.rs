//! The dashboard end to end in headless Chromium: a running stack (a replica serving the
//! dashboard, reference agents as processes, the sample plan), then `tests/browser/dashboard.mjs`
//! (playwright-core) checks the DAG's statuses and swimlanes, what blocked work waits for,
//! the agents and replicas panels, and requeues a dead letter from the UI after a routing fix
//! and a reload, until it completes. The replica has a read token, which the page asks for
//! before it shows anything. Screenshots go to `$GE_SCREENSHOTS` (the docs use
//! `GE_SCREENSHOTS=docs/screenshots`), else to a temporary directory.

#[path = "it/harness.rs"]
mod harness;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ge_orchestrator::tools::plan::Plan;
use harness::{BIN, ROUTING, Replica, T, TestEnv, eventually, http_settings, wait_ready};

const TOKEN: &str = "browser-test-token";
const READ_TOKEN: &str = "browser-read-token";

fn agent(env: &TestEnv, name: &str) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .args(["agent", name, "--", "sh", "-c", "sleep 0.2; echo ok"])
        .env("REDIS_URL", env.redis.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start a reference agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_plan_and_requeues_a_dead_letter() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir() && Path::new("/usr/bin/chromium").exists(),
        "the browser test needs playwright-core in tests/browser/node_modules and /usr/bin/chromium: run scripts/setup.sh"
    );

    let env = TestEnv::start(ROUTING).await;
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
        "screenshots": shots,
    });

    // The fix, on disk; the browser presses "reload routing" before it requeues.
    env.write_routing(&ROUTING.replace("agents:\n", "agents:\n  ghost:  { roles: [ops] }\n"));

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
    assert!(shots.join("dashboard.png").exists() && shots.join("dashboard-requeued.png").exists());
    replica.stop().await;
}
