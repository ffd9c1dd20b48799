//! The one door for operators' actions (contract v1.6): the CLI, in a process of its own
//! without a dispatch loop, wakes the replicas' dispatch as the admin API does. The replica
//! here sweeps once an hour, so only the wake-up can dispatch what an action made possible.

use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{BIN, ROUTING, Replica, T, TestEnv, eventually, http, http_settings, wait_ready};

const TOKEN: &str = "door-token";

pub(crate) fn cli(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("REDIS_URL", env.redis.url())
        .env("DATABASE_URL", &env.database_url)
        .env("GE_ROUTING_CONFIG", &env.config)
        .output()
        .expect("run the CLI")
}

/// A replica serving the admin API whose scheduler does not sweep during the test, once it
/// listens for wake-ups.
pub(crate) async fn sweepless_replica(env: &TestEnv, consumer: &str) -> (Replica, u16) {
    let (mut settings, port) = http_settings(env, consumer, Some(TOKEN));
    settings.scheduler_interval = Duration::from_secs(3600);
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    eventually(T, "the replica listening on ge:ops:wake", || async {
        let mut con = env.con.clone();
        let v: Vec<(String, u64)> = redis::cmd("PUBSUB").arg("NUMSUB").arg("ge:ops:wake").query_async(&mut con).await.unwrap();
        (v.first().map(|x| x.1).unwrap_or(0) > 0).then_some(())
    })
    .await;
    (replica, port)
}

async fn trigger(env: &TestEnv, agent: &str, dispatch_id: &str) -> std::collections::HashMap<String, String> {
    eventually(T, &format!("a trigger {dispatch_id}"), || async {
        env.triggers(agent).await.into_iter().find(|t| t["dispatch_id"] == dispatch_id)
    })
    .await
}

async fn status_is(env: &TestEnv, wp: &str, status: &str) {
    eventually(T, &format!("{wp} {status}"), || async { (env.status(wp).await.as_deref() == Some(status)).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_the_api_wake_dispatch_alike() {
    let env = TestEnv::start(ROUTING).await;
    let (replica, port) = sweepless_replica(&env, "door-1").await;
    for wp in ["d-cli", "d-api"] {
        env.submit(&[("wp_id", wp), ("agent_id", "dolly")]).await;
        let t = trigger(&env, "dolly", &format!("{wp}:1")).await;
        env.fail(&t, false).await;
        status_is(&env, wp, "failed").await;
    }

    let out = cli(&env, &["retry", "d-cli"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    trigger(&env, "dolly", "d-cli:2").await;
    let (code, v) = http(port, "POST", "/api/work-packages/d-api/retry", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    trigger(&env, "dolly", "d-api:2").await;

    // The same refusal both ways.
    let again = cli(&env, &["retry", "d-cli"]);
    assert!(!again.status.success());
    let (code, v) = http(port, "POST", "/api/work-packages/d-cli/retry", Some(TOKEN), None).await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["error"].as_str().unwrap().trim(), String::from_utf8_lossy(&again.stderr).trim());

    // A resume from the CLI dispatches what the pause held, without a sweep.
    assert!(cli(&env, &["pause", "agent", "turing"]).status.success());
    env.submit(&[("wp_id", "d-held"), ("agent_id", "turing")]).await;
    eventually(T, "d-held waiting for the pause", || async {
        let r: Option<Option<String>> =
            sqlx::query_scalar("SELECT wait_reason FROM work_packages WHERE wp_id = 'd-held'").fetch_optional(&env.pool).await.unwrap();
        r.flatten().filter(|r| r.starts_with("paused"))
    })
    .await;
    let out = cli(&env, &["resume", "agent", "turing"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    trigger(&env, "turing", "d-held:1").await;
    replica.stop().await;
}
