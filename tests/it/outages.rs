//! Redis and PostgreSQL go away and come back: loops back off and reconnect, the group is
//! recreated when lost, readiness reports the outage, and no work is lost.

use std::time::Duration;

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually, free_port, http_get};

async fn dispatched(env: &TestEnv, wp: &str) {
    eventually(T, &format!("{wp} dispatched"), || async { env.all_triggers().await.into_iter().find(|t| t["wp_id"] == wp).map(|_| ()) })
        .await
}

async fn readiness(port: u16) -> (u16, String) {
    eventually(T, "an HTTP answer", || async { http_get(port, "/readyz").await }).await
}

#[tokio::test]
async fn survives_restarts_of_redis_and_postgres_and_a_lost_group() {
    let mut env = TestEnv::start_isolated(ROUTING).await;
    let port = free_port();
    let mut s = env.settings("r1");
    s.http_addr = format!("127.0.0.1:{port}");
    let replica = Replica::spawn(s);
    env.submit(&[("wp_id", "a"), ("agent_id", "dolly")]).await;
    dispatched(&env, "a").await;
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
    let (code, body) = readiness(port).await;
    assert_eq!(code, 200, "{body}");

    // Redis dies: not ready, and says why.
    env.redis.kill();
    let (_, body) = eventually(T, "not ready without Redis", || async {
        let r = readiness(port).await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert!(body.contains("\"redis\":\"unavailable\""), "{body}");
    env.redis.restart().await.unwrap();
    eventually(T, "ready again", || async { (readiness(port).await.0 == 200).then_some(()) }).await;
    env.submit(&[("wp_id", "b"), ("agent_id", "dolly")]).await;
    dispatched(&env, "b").await;

    // PostgreSQL dies and comes back.
    let pg = env.own_postgres.as_mut().unwrap();
    pg.kill();
    let (_, body) = eventually(T, "not ready without PostgreSQL", || async {
        let r = readiness(port).await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert!(body.contains("\"postgres\":\"unavailable\""), "{body}");
    // Work submitted during the outage waits in Redis, unacknowledged.
    env.submit(&[("wp_id", "c"), ("agent_id", "dolly")]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.own_postgres.as_mut().unwrap().restart().await.unwrap();
    dispatched(&env, "c").await;

    // The group is lost: it is recreated, and what is re-delivered changes nothing.
    let mut con = env.con.clone();
    let _: i64 = redis::cmd("XGROUP").arg("DESTROY").arg("ge:work:incoming").arg("orchestrator-group").query_async(&mut con).await.unwrap();
    env.submit(&[("wp_id", "d"), ("agent_id", "dolly")]).await;
    dispatched(&env, "d").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let triggers = env.triggers("dolly").await;
    let mut ids: Vec<&str> = triggers.iter().map(|t| t["dispatch_id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, vec!["a:1", "b:1", "c:1", "d:1"], "every work package dispatched exactly once");
    for t in &triggers {
        env.complete(t).await;
    }
    for wp in ["a", "b", "c", "d"] {
        eventually(T, &format!("{wp} completed"), || async { (env.status(wp).await.as_deref() == Some("completed")).then_some(()) }).await;
    }
    replica.stop().await;
}
