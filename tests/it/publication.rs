//! Nothing counts as published until Redis holds the trigger: a trigger Redis refuses stays
//! claimed, is visible as such, and is published again until Redis takes it.

use std::time::Duration;

use crate::harness::{ROUTING, T, TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_redis_refuses_is_published_again_once_redis_takes_it() {
    let env = TestEnv::start(ROUTING).await;
    let mut con = env.con.clone();
    // A key of the wrong type where turing's trigger stream belongs: every XADD to it fails.
    let _: () = redis::cmd("SET").arg("triggers.turing").arg("oops").query_async(&mut con).await.expect("set");
    let mut settings = env.settings("r1");
    settings.republish_after = Duration::from_secs(1);
    settings.scheduler_interval = Duration::from_millis(200);
    let replica = crate::harness::Replica::spawn(settings);
    env.submit(&[("wp_id", "refused"), ("agent_id", "turing")]).await;

    let why = eventually(T, "the refusal shown on the work package", || async {
        let views = ge_orchestrator::ops::reads::work_packages(&env.pool, Some("refused"), 1).await.expect("read");
        views.into_iter().next().map(|v| v.why).filter(|w| w.contains("Redis refused its trigger"))
    })
    .await;
    assert!(why.contains("WRONGTYPE") && why.contains("triggers.turing"), "says what Redis said, and where: {why}");
    // Republication has been at it for a while, and nothing pretends the trigger is out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("ge:dispatched:*").query_async(&mut con).await.expect("keys");
    assert!(keys.is_empty(), "no dispatch key without its trigger: {keys:?}");
    let outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dispatch_outbox WHERE wp_id = 'refused'").fetch_one(&env.pool).await.expect("outbox");
    assert_eq!(outbox, 1, "the claim stays in the outbox while Redis refuses its trigger");

    let _: () = redis::cmd("DEL").arg("triggers.turing").query_async(&mut con).await.expect("del");
    let trigger = eventually(T, "the trigger published once Redis takes it", || async {
        env.triggers("turing").await.into_iter().find(|t| t["wp_id"] == "refused")
    })
    .await;
    assert_eq!(trigger["attempt"], "1", "the same dispatch, published late, not a new attempt");
    env.complete(&trigger).await;
    eventually(T, "completed", || async { (env.status("refused").await.as_deref() == Some("completed")).then_some(()) }).await;
    assert_eq!(env.triggers("turing").await.len(), 1, "published exactly once");
    replica.stop().await;
}
