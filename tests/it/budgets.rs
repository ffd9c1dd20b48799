//! Usage and budgets (contract v1.6): a plan stopped at its budget across two replicas with
//! exactly what it spent, and released by a larger budget; an agent's daily budget, released by
//! a new day; usage validated without losing a report; a held plan never delays another's work.

use std::collections::HashMap;

use crate::harness::{BIN, T, TestEnv, eventually, http, http_get};

const SOLO: &str = r#"version: 1
agents:
  solo: { roles: [worker], max_in_flight: 1 }
  thrifty: { roles: [saver], max_in_flight: 1, budget: { per_day: 0.50 } }
  free: { roles: [other] }
default_agent: solo
"#;

/// Completes a trigger, reporting that it cost `usd`.
async fn complete_costing(env: &TestEnv, t: &HashMap<String, String>, usd: &str) {
    env.report(
        "ge:work:completed",
        &[
            ("wp_id", &t["wp_id"]),
            ("dispatch_id", &t["dispatch_id"]),
            ("usage_cost", usd),
            ("usage_input_tokens", "100"),
            ("usage_model", "m"),
        ],
    )
    .await;
}

/// The triggers of `agent` whose wp_id starts with `prefix`.
async fn triggers_of(env: &TestEnv, agent: &str, prefix: &str) -> Vec<HashMap<String, String>> {
    env.triggers(agent).await.into_iter().filter(|t| t["wp_id"].starts_with(prefix)).collect()
}

/// Waits for trigger number `n` (from 1) of `prefix` and returns it.
async fn nth(env: &TestEnv, agent: &str, prefix: &str, n: usize) -> HashMap<String, String> {
    eventually(T, &format!("trigger #{n} of {prefix}"), || async { triggers_of(env, agent, prefix).await.into_iter().nth(n - 1) }).await
}

/// Waits until every open work package of `plan` waits saying `says`, and returns how many.
async fn all_waiting(env: &TestEnv, plan: &str, says: &str) -> i64 {
    eventually(T, &format!("{plan} waiting: {says}"), || async {
        let (open, saying): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE wait_reason = $2 AND held_by = 'budget:' || $1)
             FROM work_packages WHERE plan = $1 AND status NOT IN ('completed', 'dispatched')",
        )
        .bind(plan)
        .bind(says)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        (open > 0 && open == saying).then_some(open)
    })
    .await
}

async fn spent(env: &TestEnv, scope: &str, name: &str) -> String {
    sqlx::query_scalar("SELECT ge_usd(coalesce(sum(cost), 0)) FROM spend_totals WHERE scope = $1 AND name = $2")
        .bind(scope)
        .bind(name)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn warnings(env: &TestEnv, plan: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT level FROM budget_warnings WHERE scope = 'plan' AND name = $1 ORDER BY level")
        .bind(plan)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_stops_at_its_budget_across_two_replicas_with_exactly_what_it_spent() {
    const TOKEN: &str = "budget-token";
    let env = TestEnv::start(SOLO).await;
    let r1 = env.replica("r1");
    let (mut r2, port) = env.serve_process("r2", &[("GE_ADMIN_TOKEN", TOKEN)], None).await;
    const N: usize = 8;
    for i in 0..N {
        env.submit(&[("wp_id", &format!("nightly.{i}")), ("agent_id", "solo"), ("budget", "1.00")]).await;
    }
    // Each costs 0.40: after three, 1.20 is spent of 1.00, and the rest wait.
    for n in 1..=3 {
        let t = nth(&env, "solo", "nightly.", n).await;
        complete_costing(&env, &t, "0.40").await;
    }
    let held = all_waiting(&env, "nightly", "budget of plan nightly reached: 1.20 of 1.00 USD").await;
    assert_eq!(held, (N - 3) as i64);
    assert_eq!(triggers_of(&env, "solo", "nightly.").await.len(), 3, "no dispatch past the budget");
    assert_eq!(spent(&env, "plan", "nightly").await, "1.20", "exactly what it spent");
    // Warned once at 80 % (0.80 of 1.00) and once at the budget, whichever replica saw them.
    assert_eq!(warnings(&env, "nightly").await, ["reached", "warning"]);

    // Another plan's work goes at once, on the same agent, whatever the held backlog.
    env.submit(&[("wp_id", "daily.0"), ("agent_id", "solo")]).await;
    let d = nth(&env, "solo", "daily.", 1).await;
    complete_costing(&env, &d, "0.05").await;
    eventually(T, "daily.0 completed", || async { (env.status("daily.0").await.as_deref() == Some("completed")).then_some(()) }).await;

    // The API shows the plan's spend against its budget; raising the budget releases it.
    let (code, s) = http(port, "GET", "/api/spend", None, None).await;
    assert_eq!(code, 200, "{s}");
    let b = s["budgets"].as_array().unwrap().iter().find(|b| b["name"] == "nightly").cloned().unwrap();
    assert_eq!((b["spent"].as_str(), b["limit"].as_str(), b["reached"].as_bool()), (Some("1.20"), Some("1.00"), Some(true)), "{b}");
    assert_eq!(http(port, "POST", "/api/budgets/nightly", None, Some(r#"{"usd": "2"}"#)).await.0, 401);
    assert_eq!(http(port, "POST", "/api/budgets/nightly", Some(TOKEN), Some(r#"{"usd": "2,00"}"#)).await.0, 400);
    let (code, b) = http(port, "POST", "/api/budgets/nightly", Some(TOKEN), Some(r#"{"usd": "2.00"}"#)).await;
    assert_eq!((code, b["reached"].as_bool()), (200, Some(false)), "{b}");
    // 1.20 -> 1.60 -> 2.00: two more, then it holds again at exactly 2.
    for n in 4..=5 {
        let t = nth(&env, "solo", "nightly.", n).await;
        complete_costing(&env, &t, "0.40").await;
    }
    let held = all_waiting(&env, "nightly", "budget of plan nightly reached: 2.00 of 2.00 USD").await;
    assert_eq!(held, (N - 5) as i64);
    assert_eq!(triggers_of(&env, "solo", "nightly.").await.len(), 5);
    assert_eq!(spent(&env, "plan", "nightly").await, "2.00");
    assert_eq!(warnings(&env, "nightly").await, ["reached", "warning"], "a new budget, warned again");
    assert_eq!(spent(&env, "agent", "solo").await, "2.05");

    // `status` and the metrics show it too; plans are counted, not labelled.
    let out = tokio::process::Command::new(BIN).args(["status"]).env("DATABASE_URL", &env.database_url).output().await.unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("budget of plan nightly: 2.00 of 2.00 USD  REACHED"), "{status}");
    assert!(status.contains("plan  nightly") && status.contains("agent solo"), "{status}");
    let (_, metrics) = http_get(port, "/metrics").await.unwrap();
    assert!(metrics.contains("ge_budget_plans{state=\"reached\"} 1"), "{metrics}");
    assert!(metrics.contains("ge_spend_usd_total{agent=\"solo\"} 2.05"), "{metrics}");
    assert!(!metrics.contains("nightly"), "no plan as a label");

    // The CLI removes the budget: the rest goes, seen by the next sweep.
    let out = tokio::process::Command::new(BIN)
        .args(["budget", "remove", "nightly"])
        .env("DATABASE_URL", &env.database_url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A later entry's budget does not set one again: an operator removed it.
    env.submit(&[("wp_id", "nightly.8"), ("agent_id", "solo"), ("budget", "0.01")]).await;
    for n in 6..=N + 1 {
        let t = nth(&env, "solo", "nightly.", n).await;
        complete_costing(&env, &t, "0.40").await;
    }
    eventually(T, "nightly.8 completed", || async { (env.status("nightly.8").await.as_deref() == Some("completed")).then_some(()) }).await;
    r1.stop().await;
    r2.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_s_daily_budget_holds_its_work_until_the_next_day() {
    let env = TestEnv::start(SOLO).await;
    let (r1, r2) = (env.replica("r1"), env.replica("r2"));
    for i in 0..4 {
        env.submit(&[("wp_id", &format!("save.{i}")), ("agent_id", "thrifty")]).await;
    }
    for n in 1..=2 {
        let t = nth(&env, "thrifty", "save.", n).await;
        complete_costing(&env, &t, "0.30").await;
    }
    // 0.60 of 0.50 spent today: the agent takes nothing more.
    let reason = "budget of agent thrifty reached: 0.60 of 0.50 USD per day";
    for wp in ["save.2", "save.3"] {
        eventually(T, &format!("{wp} waiting for the budget"), || async {
            let r: Option<String> =
                sqlx::query_scalar("SELECT wait_reason FROM work_packages WHERE wp_id = $1").bind(wp).fetch_one(&env.pool).await.unwrap();
            (r.as_deref() == Some(reason)).then_some(())
        })
        .await;
    }
    assert_eq!(triggers_of(&env, "thrifty", "save.").await.len(), 2);
    assert_eq!(spent(&env, "agent", "thrifty").await, "0.60");
    // A new day (the spend moved to yesterday): its work goes again.
    sqlx::query("UPDATE spend_totals SET day = day - 1 WHERE scope = 'agent' AND name = 'thrifty'").execute(&env.pool).await.unwrap();
    nth(&env, "thrifty", "save.", 3).await;
    r1.stop().await;
    r2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_usage_is_dead_lettered_and_the_report_still_applies() {
    let env = TestEnv::start(SOLO).await;
    let r1 = env.replica("r1");
    env.submit(&[("wp_id", "u.a"), ("agent_id", "solo")]).await;
    let a = nth(&env, "solo", "u.a", 1).await;
    env.report("ge:work:completed", &[("wp_id", "u.a"), ("dispatch_id", &a["dispatch_id"]), ("usage_cost", "lots")]).await;
    eventually(T, "u.a completed", || async { (env.status("u.a").await.as_deref() == Some("completed")).then_some(()) }).await;
    let dl = eventually(T, "the usage dead-lettered", || async {
        env.deadletters().await.into_iter().find(|d| d.get("reason").map(String::as_str) == Some("invalid_usage"))
    })
    .await;
    assert!(dl["detail"].contains("usage_cost \"lots\"") && dl["detail"].contains("applied without its usage"), "{dl:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM dispatch_usage").fetch_one(&env.pool).await.unwrap();
    assert_eq!(rows, 0);
    // A budget that is no amount refuses its entry, as any malformed field does.
    env.submit(&[("wp_id", "u.bad"), ("agent_id", "solo"), ("budget", "1e3")]).await;
    let dl = eventually(T, "the entry with a bad budget dead-lettered", || async {
        env.deadletters().await.into_iter().find(|d| d.get("wp_id").map(String::as_str) == Some("u.bad"))
    })
    .await;
    assert_eq!(dl["reason"], "invalid", "{dl:?}");
    assert!(dl["detail"].starts_with("budget \"1e3\" is not an amount of USD"), "{dl:?}");

    // A report of a dispatch counts once, a repeated one adds nothing; an older attempt's
    // usage counts (the money was spent).
    env.submit(&[("wp_id", "u.b"), ("agent_id", "solo")]).await;
    let b = nth(&env, "solo", "u.b", 1).await;
    env.fail(&b, true).await;
    let b2 = nth(&env, "solo", "u.b", 2).await;
    complete_costing(&env, &b2, "0.25").await;
    complete_costing(&env, &b2, "0.25").await;
    complete_costing(&env, &b, "0.125").await;
    eventually(T, "u.b's usage recorded", || async { (spent(&env, "plan", "u").await == "0.375").then_some(()) }).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM dispatch_usage WHERE wp_id = 'u.b'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(n, 2);
    r1.stop().await;
}

/// Work that would be claimed by its own ingest (an agent without cap or limit) goes through a
/// round when its plan has a budget: once reached, new work of the plan waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_work_of_a_plan_past_its_budget_waits_on_an_agent_without_a_cap() {
    let env = TestEnv::start(SOLO).await;
    let r1 = env.replica("r1");
    env.submit(&[("wp_id", "lavish.0"), ("agent_id", "free"), ("budget", "0.30")]).await;
    let t = nth(&env, "free", "lavish.", 1).await;
    complete_costing(&env, &t, "0.40").await;
    eventually(T, "lavish.0 completed", || async { (env.status("lavish.0").await.as_deref() == Some("completed")).then_some(()) }).await;
    env.submit(&[("wp_id", "lavish.1"), ("agent_id", "free")]).await;
    assert_eq!(all_waiting(&env, "lavish", "budget of plan lavish reached: 0.40 of 0.30 USD").await, 1);
    assert_eq!(triggers_of(&env, "free", "lavish.").await.len(), 1);
    // Another plan on the same agent is claimed at its ingest as before.
    env.submit(&[("wp_id", "thrift.0"), ("agent_id", "free")]).await;
    nth(&env, "free", "thrift.", 1).await;
    r1.stop().await;
}

/// `ge-orchestrator dev` with its own demo agents, which report made-up usage: the plan's
/// spend is shown when it finishes.
#[test]
fn dev_shows_what_the_plan_spent() {
    let logs = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["dev", "--exit-when-done", "--log-dir"])
        .arg(logs.path())
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run dev");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dev failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("9 completed, 0 failed"), "{stdout}");
    let plan = stdout.lines().find(|l| l.trim_start().starts_with("plan  run")).unwrap_or_else(|| panic!("no plan spend: {stdout}"));
    assert!(plan.contains(" USD (today ") && plan.contains("9 reports"), "{plan}");
    assert!(stdout.contains("spend (USD):"), "{stdout}");
}

/// The reference agent reads what its command wrote to `GE_USAGE_FILE` and reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_agent_reports_the_usage_its_command_wrote() {
    let env = TestEnv::start(SOLO).await;
    let r1 = env.replica("r1");
    let script = r#"printf '{"input_tokens": 1200, "output_tokens": 300, "cost": "0.0125", "model": "m-1"}' > "$GE_USAGE_FILE"; echo ok"#;
    let _agent = tokio::process::Command::new(BIN)
        .args(["agent", "solo", "--", "sh", "-c", script])
        .env("REDIS_URL", env.redis.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    env.submit(&[("wp_id", "ref.a"), ("agent_id", "solo")]).await;
    let row: (String, i64, i64, String, String, String) = eventually(T, "the usage of ref.a", || async {
        sqlx::query_as(
            "SELECT dispatch_id, input_tokens, output_tokens, ge_usd(cost), model, agent_id FROM dispatch_usage WHERE wp_id = 'ref.a'",
        )
        .fetch_optional(&env.pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(row, ("ref.a:1".into(), 1200, 300, "0.0125".into(), "m-1".into(), "solo".into()));
    assert_eq!(env.status("ref.a").await.as_deref(), Some("completed"));
    r1.stop().await;
}
