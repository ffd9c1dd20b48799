//! Structured logs: with `--log-format json` every line is a JSON object, and every line that
//! concerns one work package carries its `wp_id` (and `dispatch_id` once it has one).

use std::process::{Command, Stdio};

use crate::harness::{BIN, ROUTING, T, TestEnv, eventually};

#[tokio::test]
async fn json_logs_name_the_work_package_and_dispatch() {
    let env = TestEnv::start(ROUTING).await;
    let log = env.dir.path().join("replica.log");
    let mut replica = Command::new(BIN)
        .args(["run", "--consumer", "logs-1", "--block", "200ms", "--http-addr", "off", "--log-format", "json"])
        .env("REDIS_URL", env.redis.url())
        .env("DATABASE_URL", &env.database_url)
        .env("GE_ROUTING_CONFIG", &env.config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    env.submit(&[("wp_id", "log-ok"), ("agent_id", "dolly")]).await;
    env.submit(&[("wp_id", "log-bad"), ("agent_id", "ghost")]).await;
    let t = eventually(T, "log-ok dispatched", || async { env.triggers("dolly").await.into_iter().find(|t| t["wp_id"] == "log-ok") }).await;
    env.complete(&t).await;
    eventually(T, "log-ok completed", || async { (env.status("log-ok").await.as_deref() == Some("completed")).then_some(()) }).await;
    unsafe { libc::kill(replica.id() as i32, libc::SIGTERM) };
    replica.wait().unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let about = |wp: &str| -> Vec<&serde_json::Value> { lines.iter().filter(|l| l.to_string().contains(wp)).collect() };
    for wp in ["log-ok", "log-bad"] {
        let ls = about(wp);
        assert!(!ls.is_empty(), "no line about {wp}:\n{text}");
        for l in ls {
            assert_eq!(l["wp_id"], wp, "a line about {wp} without its wp_id field: {l}");
        }
    }
    let msgs: Vec<&str> = about("log-ok").iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(msgs.contains(&"dispatching") && msgs.contains(&"work package completed"), "{msgs:?}");
    for l in about("log-ok") {
        assert_eq!(l["dispatch_id"], "log-ok:1", "{l}");
    }
    assert!(about("log-bad").iter().any(|l| l["reason"] == "unknown_agent"), "{text}");
}
