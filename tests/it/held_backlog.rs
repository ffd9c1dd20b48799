//! One agent's held backlog never holds another's work (the dispatch path rebuilt): work that
//! waits because its agent is paused or full, or its plan is paused, is not read by the rounds
//! that look for work of other agents, however much of it there is.

use ge_orchestrator::engine::controls::{self, PauseScope};

use crate::harness::{Replica, T, TestEnv, eventually};

const TWO: &str = r#"version: 1
agents:
  ada:    { roles: [developer], max_in_flight: 1 }
  turing: { roles: [reviewer], max_in_flight: 1 }
"#;

/// More than a round reads (1,000): what the old rounds read of it crowded out the rest.
const BACKLOG: usize = 1_100;

/// XADDs `n` entries in pipelines, `fields(i)` each.
async fn submit_many(env: &TestEnv, n: usize, fields: impl Fn(usize) -> Vec<(String, String)>) {
    let mut con = env.con.clone();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let cmd = pipe.cmd("XADD").arg("ge:work:incoming").arg("*");
            for (k, v) in fields(*i) {
                cmd.arg(k).arg(v);
            }
        }
        let _: Vec<String> = pipe.query_async(&mut con).await.expect("xadd backlog");
    }
}

async fn stored(env: &TestEnv, like: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE wp_id LIKE $1").bind(like).fetch_one(&env.pool).await.expect("count")
}

/// turing's three work packages go one after the other, each as the one before completes.
/// With no `plan` they share the held backlog's fairness key; with one, it sorts after the keys
/// of the held backlog.
async fn turing_runs_three_in_turn(env: &TestEnv, plan: Option<&str>) {
    for i in 0..3 {
        let wp = format!("t{i}");
        let mut fields = vec![("wp_id", wp.as_str()), ("agent_id", "turing")];
        fields.extend(plan.map(|p| ("plan", p)));
        env.submit(&fields).await;
    }
    for i in 0..3 {
        let wp = format!("t{i}");
        let trigger = eventually(T, &format!("{wp} dispatched past the held backlog"), || async {
            env.triggers("turing").await.into_iter().find(|t| t["wp_id"] == wp)
        })
        .await;
        env.complete(&trigger).await;
    }
}

/// A sweep every 200 ms, so that the old rounds, which read the held backlog again each time,
/// had every chance to get to turing's work.
fn replica(env: &TestEnv) -> Replica {
    let mut settings = env.settings("r1");
    settings.scheduler_interval = std::time::Duration::from_millis(200);
    Replica::spawn(settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_s_backlog_never_holds_another_agent_s_work() {
    let env = TestEnv::start(TWO).await;
    controls::pause(&env.pool, PauseScope::Agent, "ada", Some("vendor outage")).await.expect("pause ada");
    let r = replica(&env);
    submit_many(&env, BACKLOG, |i| vec![("wp_id".into(), format!("a{i:05}")), ("agent_id".into(), "ada".into())]).await;
    eventually(T, "ada's backlog stored", || async { (stored(&env, "a%").await == BACKLOG as i64).then_some(()) }).await;

    turing_runs_three_in_turn(&env, None).await;
    assert!(env.triggers("ada").await.is_empty(), "a paused agent gets nothing");

    // The resume is the event that wakes ada's backlog, one at a time.
    controls::resume(&env.pool, PauseScope::Agent, "ada").await.expect("resume ada");
    let first = eventually(T, "ada's first after the resume", || async { env.triggers("ada").await.into_iter().next() }).await;
    assert_eq!(first["wp_id"], "a00000", "the backlog goes in incoming order");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_agent_s_backlog_never_holds_another_agent_s_work() {
    let env = TestEnv::start(TWO).await;
    let r = replica(&env);
    env.submit(&[("wp_id", "plug"), ("agent_id", "ada")]).await;
    let plug = eventually(T, "ada busy", || async { env.triggers("ada").await.into_iter().next() }).await;
    submit_many(&env, BACKLOG, |i| vec![("wp_id".into(), format!("a{i:05}")), ("agent_id".into(), "ada".into())]).await;
    eventually(T, "ada's backlog stored", || async { (stored(&env, "a%").await == BACKLOG as i64).then_some(()) }).await;

    turing_runs_three_in_turn(&env, None).await;
    assert_eq!(env.triggers("ada").await.len(), 1, "ada stays at its cap");

    // The freed slot is the event that wakes ada's backlog.
    env.complete(&plug).await;
    let next = eventually(T, "ada's next once its slot is free", || async { env.triggers("ada").await.into_iter().nth(1) }).await;
    assert_eq!(next["wp_id"], "a00000");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_plan_of_a_thousand_fairness_keys_never_holds_another_plan_s_work() {
    let env = TestEnv::start(TWO).await;
    controls::pause(&env.pool, PauseScope::Plan, "night", None).await.expect("pause the plan");
    let r = replica(&env);
    // Each its own fairness key, all sorting before turing's other plan ("zz-day").
    submit_many(&env, 1_000, |i| {
        vec![
            ("wp_id".into(), format!("n{i:05}")),
            ("agent_id".into(), "turing".into()),
            ("plan".into(), "night".into()),
            ("fairness_key".into(), format!("k{i:05}")),
        ]
    })
    .await;
    eventually(T, "the paused plan stored", || async { (stored(&env, "n%").await == 1_000).then_some(()) }).await;

    turing_runs_three_in_turn(&env, Some("zz-day")).await;
    assert!(env.triggers("turing").await.iter().all(|t| !t["wp_id"].starts_with('n')), "a paused plan's work waits");

    controls::resume(&env.pool, PauseScope::Plan, "night").await.expect("resume the plan");
    eventually(T, "the plan's work goes once it is resumed", || async {
        env.triggers("turing").await.into_iter().find(|t| t["wp_id"].starts_with('n'))
    })
    .await;
    r.stop().await;
}
