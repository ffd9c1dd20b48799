//! Entries left pending by a consumer that died: the lane gate holds later entries of the
//! lane, the sweep takes the entries over, acknowledges deleted ones and dead-letters poison.

use std::time::Duration;

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually};

/// Reads `count` new entries of the incoming stream as consumer `name`, and never acks them.
async fn read_as(env: &TestEnv, name: &str, count: usize) -> Vec<String> {
    let mut con = env.con.clone();
    ge_orchestrator::engine::streams::ensure_group(&mut con, "ge:work:incoming", "orchestrator-group").await.unwrap();
    ge_orchestrator::engine::streams::read_group(&mut con, "ge:work:incoming", "orchestrator-group", name, count, None, ">")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

async fn lease(env: &TestEnv, consumer: &str, ttl_ms: u64) {
    let mut con = env.con.clone();
    let _: () = redis::cmd("SET")
        .arg(format!("ge:lease:orchestrator-group:{consumer}"))
        .arg("x")
        .arg("PX")
        .arg(ttl_ms)
        .query_async(&mut con)
        .await
        .unwrap();
}

async fn consumers(env: &TestEnv) -> Vec<String> {
    let mut con = env.con.clone();
    ge_orchestrator::engine::streams::group_consumers(&mut con, "ge:work:incoming", "orchestrator-group")
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[tokio::test]
async fn a_consumer_whose_lease_lapses_is_taken_over_at_once_and_removed() {
    let env = TestEnv::start(ROUTING).await;
    for i in 0..5 {
        env.submit(&[("wp_id", &format!("k{i}")), ("agent_id", "dolly")]).await;
    }
    lease(&env, "killed", 1000).await;
    assert_eq!(read_as(&env, "killed", 5).await.len(), 5);
    // The XAUTOCLAIM backstop keeps its 60 s defaults: only the lease can explain a fast takeover.
    let replica = env.replica("survivor");
    let start = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(env.triggers("dolly").await.is_empty(), "a consumer with a live lease keeps its entries");
    eventually(T, "all five taken over", || async { (env.triggers("dolly").await.len() == 5).then_some(()) }).await;
    assert!(start.elapsed() < Duration::from_secs(20), "taken over long before the 60 s sweep");
    eventually(T, "the dead consumer removed", || async { (!consumers(&env).await.contains(&"killed".to_string())).then_some(()) }).await;
    assert!(consumers(&env).await.contains(&"survivor".to_string()));
    replica.stop().await;
}

#[tokio::test]
async fn a_lane_waits_for_an_earlier_entry_pending_elsewhere_until_it_is_taken_over() {
    let env = TestEnv::start(ROUTING).await;
    env.submit(&[("wp_id", "five"), ("agent_id", "dolly"), ("lane", "L")]).await;
    // A replica that read five, holds a lease for 1.5 s more, and then is gone.
    lease(&env, "dead-replica", 1500).await;
    let held = read_as(&env, "dead-replica", 1).await;
    assert_eq!(held.len(), 1);
    env.submit(&[("wp_id", "six"), ("agent_id", "dolly"), ("lane", "L")]).await;

    let replica = env.replica("survivor");
    eventually(T, "six ingested", || async { env.status("six").await }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(env.triggers("dolly").await.is_empty(), "six must not start while five is pending with another consumer");
    let view = ge_orchestrator::ops::reads::work_packages(&env.pool, Some("six"), 1).await.unwrap();
    assert!(view[0].why.contains("still being ingested"), "{}", view[0].why);

    // Once the lease lapses, five is taken over; it runs first.
    let first = eventually(T, "five taken over and dispatched", || async { env.triggers("dolly").await.into_iter().next() }).await;
    assert_eq!(first["wp_id"], "five");
    assert_eq!(env.status("six").await.as_deref(), Some("blocked"));
    env.complete(&first).await;
    let second = eventually(T, "six dispatched", || async { env.triggers("dolly").await.into_iter().nth(1) }).await;
    assert_eq!(second["wp_id"], "six");
    replica.stop().await;
}

#[tokio::test]
async fn the_sweep_acknowledges_deleted_entries_and_dead_letters_poison() {
    let env = TestEnv::start(ROUTING).await;
    let gone = env.submit(&[("wp_id", "gone"), ("agent_id", "dolly")]).await;
    let poison = env.submit(&[("wp_id", "poison"), ("agent_id", "dolly")]).await;
    assert_eq!(read_as(&env, "dead-replica", 2).await.len(), 2);
    let mut con = env.con.clone();
    let _: i64 = redis::cmd("XDEL").arg("ge:work:incoming").arg(&gone).query_async(&mut con).await.unwrap();
    // Deliver "poison" over and over, as replicas that crash on it would.
    for _ in 0..6 {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg("ge:work:incoming")
            .arg("orchestrator-group")
            .arg("dead-replica")
            .arg(0)
            .arg(&poison)
            .query_async(&mut con)
            .await
            .unwrap();
    }

    let mut s = env.settings("survivor");
    s.recover_interval = Duration::from_millis(200);
    s.claim_min_idle = Duration::from_millis(100);
    s.max_deliveries = 5;
    let replica = Replica::spawn(s);
    let dls = eventually(T, "two dead letters", || async {
        let d = env.deadletters().await;
        (d.len() == 2).then_some(d)
    })
    .await;
    let reason = |id: &str| dls.iter().find(|d| d["source_id"] == id).map(|d| d["reason"].clone());
    assert_eq!(reason(&gone).as_deref(), Some("deleted"));
    assert_eq!(reason(&poison).as_deref(), Some("poison"));
    let p = dls.iter().find(|d| d["source_id"] == poison).unwrap();
    assert_eq!(p["wp_id"], "poison", "the original fields travel with it");
    assert!(p["detail"].contains("max_deliveries"), "{p:?}");
    eventually(T, "nothing pending", || async { (env.pending().await == 0).then_some(()) }).await;
    assert!(env.status("poison").await.is_none(), "a poison entry is not ingested");
    replica.stop().await;
}

#[tokio::test]
async fn an_unconfirmed_dispatch_is_published_again_but_never_twice() {
    let env = TestEnv::start(ROUTING).await;
    let mut s = env.settings("r1");
    s.republish_after = Duration::from_millis(200);
    let replica = Replica::spawn(s);
    env.submit(&[("wp_id", "x"), ("agent_id", "dolly")]).await;
    eventually(T, "x dispatched", || async { (env.triggers("dolly").await.len() == 1).then_some(()) }).await;
    let unconfirm = || async {
        sqlx::query("INSERT INTO dispatch_outbox (dispatch_id, wp_id, claimed_at) VALUES ('x:1', 'x', now() - interval '1 hour')")
            .execute(&env.pool)
            .await
            .unwrap();
    };
    let confirmed = || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dispatch_outbox").fetch_one(&env.pool).await.unwrap();
        (left == 0).then_some(())
    };

    // As if the replica died after XADD but before recording it: published again, no duplicate.
    unconfirm().await;
    eventually(T, "republished", confirmed).await;
    assert_eq!(env.triggers("dolly").await.len(), 1, "the same dispatch_id is never added twice");

    // As if it died before the XADD: the trigger appears, with the claimed dispatch_id.
    let mut con = env.con.clone();
    let _: i64 = redis::cmd("DEL").arg("triggers.dolly").arg("ge:dispatched:x:1").query_async(&mut con).await.unwrap();
    unconfirm().await;
    let t = eventually(T, "published after all", || async { env.triggers("dolly").await.into_iter().next() }).await;
    assert_eq!(t["dispatch_id"], "x:1");
    replica.stop().await;
}

/// A takeover that takes longer than the lease lives (here: PostgreSQL holds the work of the
/// dead consumer behind a lock) must not let the survivor's own lease lapse, or a third
/// replica would take the survivor over in turn.
#[tokio::test]
async fn a_slow_takeover_does_not_let_the_survivors_own_lease_lapse() {
    let env = TestEnv::start(ROUTING).await;
    env.submit(&[("wp_id", "slow-1"), ("agent_id", "dolly")]).await;
    assert_eq!(read_as(&env, "gone", 1).await.len(), 1);
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE work_packages IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();

    let mut settings = env.settings("survivor");
    settings.lease_ttl = Duration::from_millis(1000);
    settings.lease_refresh = Duration::from_millis(200);
    let replica = Replica::spawn(settings);
    let key = "ge:lease:orchestrator-group:survivor";
    let mut con = env.con.clone();
    eventually(T, "the survivor's lease", || {
        let mut con = con.clone();
        async move { redis::cmd("EXISTS").arg(key).query_async::<bool>(&mut con).await.unwrap().then_some(()) }
    })
    .await;
    // The takeover has claimed the entry and is stuck on the lock.
    eventually(T, "the entry claimed by the survivor", || async {
        let p =
            ge_orchestrator::engine::streams::pending_summary(&mut env.con.clone(), "ge:work:incoming", "orchestrator-group").await.ok()?;
        (p.consumers.iter().any(|(c, n)| c == "survivor" && *n == 1)).then_some(())
    })
    .await;
    // Three lease lifetimes while the takeover is stuck: the lease never lapses.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let alive: bool = redis::cmd("EXISTS").arg(key).query_async(&mut con).await.unwrap();
        assert!(alive, "the survivor's lease lapsed while its takeover was slow");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lock.commit().await.unwrap();
    eventually(T, "slow-1 dispatched", || async { (env.status("slow-1").await.as_deref() == Some("dispatched")).then_some(()) }).await;
    replica.stop().await;
}
