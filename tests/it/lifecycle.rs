//! A replica's life: routing reloads, graceful shutdown as a real process, the CLI's
//! configuration checks.

use std::process::Command;
use std::time::Duration;

use crate::harness::{BIN, ROUTING, T, TestEnv, eventually, free_port};

const TO_ADA: &str = r#"version: 1
agents:
  ada:    { roles: [developer] }
  turing: { roles: [reviewer] }
work_types:
  implement: developer
"#;

const TO_TURING: &str = r#"version: 1
agents:
  ada:    { roles: [developer] }
  turing: { roles: [reviewer] }
work_types:
  implement: reviewer
"#;

async fn agent_of(env: &TestEnv, wp: &str) -> String {
    eventually(T, &format!("trigger of {wp}"), || async {
        for a in ["ada", "turing"] {
            if env.triggers(a).await.iter().any(|t| t["wp_id"] == wp) {
                return Some(a.to_string());
            }
        }
        None
    })
    .await
}

async fn reload(env: &TestEnv) {
    let mut con = env.con.clone();
    let n: u64 = redis::cmd("PUBLISH").arg("ge:config:reload").arg("now").query_async(&mut con).await.unwrap();
    assert!(n >= 1, "a replica is subscribed");
}

#[tokio::test]
async fn reload_swaps_a_valid_file_and_refuses_an_invalid_one() {
    let env = TestEnv::start(TO_ADA).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "before"), ("work_type", "implement")]).await;
    assert_eq!(agent_of(&env, "before").await, "ada");

    env.write_routing(TO_TURING);
    reload(&env).await;
    // The reload is asynchronous; keep submitting until one lands on the new route.
    let mut i = 0;
    eventually(T, "the new routing in force", || {
        i += 1;
        let wp = format!("after{i}");
        let env = &env;
        async move {
            env.submit(&[("wp_id", &wp), ("work_type", "implement")]).await;
            (agent_of(env, &wp).await == "turing").then_some(())
        }
    })
    .await;

    env.write_routing("version: 1\nagents:\n  ada: { roles: [developer], colour: blue }\n");
    reload(&env).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.submit(&[("wp_id", "still"), ("work_type", "implement")]).await;
    assert_eq!(agent_of(&env, "still").await, "turing", "an invalid file is refused and the old routing stays");
    replica.stop().await;
}

#[tokio::test]
async fn sigterm_drains_and_leaves_nothing_pending() {
    let env = TestEnv::start(ROUTING).await;
    let mut child = Command::new(BIN)
        .args(["run", "--consumer", "proc-1", "--block", "200ms", "--batch-size", "10"])
        // Serving HTTP, as in production, but not on the default port, which another program
        // may hold.
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("REDIS_URL", env.redis.url())
        .env("DATABASE_URL", &env.database_url)
        .env("GE_ROUTING_CONFIG", &env.config)
        .spawn()
        .expect("start the replica");
    let n = 300;
    for i in 0..n {
        env.submit(&[("wp_id", &format!("s{i}")), ("agent_id", "dolly")]).await;
    }
    // Stop while it is still working through the backlog.
    eventually(T, "some work ingested", || async {
        let c: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages").fetch_one(&env.pool).await.unwrap();
        (c > 0).then_some(())
    })
    .await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit 0 after SIGTERM, got {status}");

    assert_eq!(env.pending().await, 0, "nothing left pending");
    let mut con = env.con.clone();
    let consumers: redis::Value =
        redis::cmd("XINFO").arg("CONSUMERS").arg("ge:work:incoming").arg("orchestrator-group").query_async(&mut con).await.unwrap();
    assert!(!format!("{consumers:?}").contains("proc-1"), "the consumer left the group: {consumers:?}");
    let health = env.entries("system.health").await;
    assert!(
        health.iter().any(|h| h["instance"] == "proc-1" && h["status"] == "stopping" && h["component"] == "ge-orchestrator"),
        "a stopping health entry: {health:?}"
    );
    // Whatever was read was finished: every acknowledged entry is a work package.
    let ingested: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages").fetch_one(&env.pool).await.unwrap();
    let info: redis::Value = redis::cmd("XINFO").arg("GROUPS").arg("ge:work:incoming").query_async(&mut con).await.unwrap();
    let read_all = format!("{info:?}");
    assert!(ingested > 0 && ingested <= n, "{ingested} ingested; group {read_all}");
    let unread: i64 = {
        let s = ge_orchestrator::engine::streams::pending_summary(&mut con, "ge:work:incoming", "orchestrator-group").await.unwrap();
        s.count as i64
    };
    assert_eq!(unread, 0);

    // A second replica picks up the rest: nothing was lost.
    let replica = env.replica("r2");
    eventually(T, "all work packages ingested", || async {
        let c: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages").fetch_one(&env.pool).await.unwrap();
        (c == n).then_some(())
    })
    .await;
    replica.stop().await;
}

#[test]
fn check_config_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "version: 1\nagents:\n  ada: { roles: [developer] }\nwork_types:\n  implement: reviewr\n").unwrap();
    let out = Command::new(BIN).args(["check-config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5:", bad.display())), "file and line: {err}");
    assert!(err.contains("reviewr"), "{err}");

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, ROUTING).unwrap();
    let out = Command::new(BIN).args(["check-config"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    for word in ["ada", "turing", "hopper", "github.pull_request.*", "dolly"] {
        assert!(table.contains(word), "resolved table shows {word}: {table}");
    }

    let out = Command::new(BIN)
        .args(["route", "--explain", "--config"])
        .arg(&good)
        .args(["work_type=implement", "--in-flight", "ada=4"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("turing") && text.contains("work_type"), "ada is full so turing: {text}");
    let out = Command::new(BIN).args(["route", "--config"]).arg(&good).arg("agent_id=nobody").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown_agent"));
}
