//! Network partitions (issue 19): a replica that loses a link it needs hands its work over
//! as fast as a dead one, says so in `/readyz`, and comes back when the link does. The links
//! run through the project's switchable proxy, which the test cuts.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ge_orchestrator::tools::proxy::TcpProxy;
use tokio_util::sync::CancellationToken;

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually, free_port, http_get};

/// The port of a `postgres://user@127.0.0.1:PORT/db` URL, and the URL with another port.
fn through(database_url: &str, port: u16) -> (u16, String) {
    let (head, rest) = database_url.rsplit_once(':').expect("a port in the URL");
    let (old, db) = rest.split_once('/').expect("a database in the URL");
    (old.parse().expect("a numeric port"), format!("{head}:{port}/{db}"))
}

/// Completes every trigger of `dolly` once, as an agent would, until `stop`.
fn agent(env: Arc<TestEnv>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let done: Mutex<HashSet<String>> = Mutex::default();
        while !stop.is_cancelled() {
            for t in env.triggers("dolly").await {
                if done.lock().unwrap().insert(t["dispatch_id"].clone()) {
                    env.complete(&t).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn all_completed(env: &TestEnv, wps: &[String]) -> bool {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE wp_id = ANY($1) AND status = 'completed'")
        .bind(wps)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    n == wps.len() as i64
}

async fn submit(env: &TestEnv, prefix: &str, n: usize) -> Vec<String> {
    let mut wps = Vec::new();
    for i in 0..n {
        let wp = format!("{prefix}-{i}");
        env.submit(&[("wp_id", &wp), ("agent_id", "dolly")]).await;
        wps.push(wp);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wps
}

async fn lease_exists(env: &TestEnv, consumer: &str) -> bool {
    let mut con = env.con.clone();
    redis::cmd("EXISTS").arg(format!("ge:lease:orchestrator-group:{consumer}")).query_async(&mut con).await.unwrap()
}

/// Two replicas; `cut` reaches Redis directly and PostgreSQL through a proxy. While the proxy
/// is cut (open connections reset, new ones refused), work keeps coming: all of it completes
/// through the other replica long before the 60 s recovery sweep, whichever replica read it.
/// Before the fix, `cut` kept its lease and retried what it had read until the link healed.
#[tokio::test]
async fn a_replica_cut_from_postgres_hands_its_work_over_and_comes_back() {
    let env = Arc::new(TestEnv::start(ROUTING).await);
    let (pg_port, _) = through(&env.database_url, 0);
    let proxy = TcpProxy::start(pg_port).await.unwrap();
    let (_, proxied) = through(&env.database_url, proxy.port());

    let whole = env.replica("whole");
    let http = free_port();
    let mut s = env.settings("cut");
    s.conn.database_url = proxied;
    s.http_addr = format!("127.0.0.1:{http}");
    let cut = Replica::spawn(s);
    let stop = CancellationToken::new();
    let agent = agent(env.clone(), stop.clone());

    let before = submit(&env, "before", 10).await;
    eventually(T, "the work sent before the cut completed", || async { all_completed(&env, &before).await.then_some(()) }).await;
    assert_eq!(http_get(http, "/readyz").await.map(|r| r.0), Some(200));

    proxy.cut();
    let started = Instant::now();
    let during = submit(&env, "during", 40).await;
    eventually(Duration::from_secs(20), "every work package sent during the cut completed through the other replica", || async {
        all_completed(&env, &during).await.then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(30), "handed over long before the 60 s recovery sweep");
    let (code, body) = http_get(http, "/readyz").await.expect("an answer from the cut replica");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("PostgreSQL"), "the reason is given: {body}");
    assert!(!lease_exists(&env, "cut").await, "a replica that cannot do its work holds no lease");

    // The link heals: the replica takes its lease again, is ready, and does work alone.
    proxy.heal();
    eventually(T, "ready again", || async { http_get(http, "/readyz").await.filter(|r| r.0 == 200).map(|_| ()) }).await;
    assert!(lease_exists(&env, "cut").await);
    whole.stop().await;
    let after = submit(&env, "after", 10).await;
    eventually(T, "the work sent after the heal completed by the healed replica alone", || async {
        all_completed(&env, &after).await.then_some(())
    })
    .await;

    let triggers = env.triggers("dolly").await;
    let ids: HashSet<&str> = triggers.iter().map(|t| t["dispatch_id"].as_str()).collect();
    assert_eq!(ids.len(), triggers.len(), "no dispatch_id published twice");
    assert_eq!(ids.len(), 60);
    stop.cancel();
    agent.await.unwrap();
    cut.stop().await;
}

/// The other way round: `cut` reaches PostgreSQL but not Redis. Its lease lapses, the other
/// replica takes its entries over, and what it had claimed in PostgreSQL but could not publish
/// is published by the other (republication) or by itself after the heal, once: no trigger
/// twice, nothing left behind.
#[tokio::test]
async fn a_replica_cut_from_redis_is_taken_over_and_sends_no_trigger_twice() {
    let env = Arc::new(TestEnv::start(ROUTING).await);
    let proxy = TcpProxy::start(env.redis.port()).await.unwrap();
    let mut s = env.settings("whole");
    s.republish_after = Duration::from_secs(1);
    let whole = Replica::spawn(s);
    let mut s = env.settings("cut");
    s.conn.redis_url = format!("redis://127.0.0.1:{}", proxy.port());
    s.republish_after = Duration::from_secs(1);
    let cut = Replica::spawn(s);
    let stop = CancellationToken::new();
    let agent = agent(env.clone(), stop.clone());

    let before = submit(&env, "before", 10).await;
    eventually(T, "the work sent before the cut completed", || async { all_completed(&env, &before).await.then_some(()) }).await;
    eventually(T, "both replicas hold a lease", || async {
        (lease_exists(&env, "cut").await && lease_exists(&env, "whole").await).then_some(())
    })
    .await;

    proxy.cut();
    let during = submit(&env, "during", 40).await;
    eventually(Duration::from_secs(20), "every work package sent during the cut completed", || async {
        all_completed(&env, &during).await.then_some(())
    })
    .await;
    proxy.heal();
    // The healed replica publishes whatever it still holds: a no-op for what went out already.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = submit(&env, "after", 10).await;
    eventually(T, "the work sent after the heal completed", || async { all_completed(&env, &after).await.then_some(()) }).await;

    let triggers = env.triggers("dolly").await;
    let ids: HashSet<&str> = triggers.iter().map(|t| t["dispatch_id"].as_str()).collect();
    assert_eq!(ids.len(), triggers.len(), "no dispatch_id published twice");
    assert_eq!(ids.len(), 60);
    stop.cancel();
    agent.await.unwrap();
    cut.stop().await;
    whole.stop().await;
}

/// A replica alone, cut from PostgreSQL: nobody can take over what it gave up when it stood
/// down, so it reads its own pending entries first when the link heals, instead of leaving
/// them to the 60 s recovery sweep.
#[tokio::test]
async fn a_lone_replica_takes_up_again_what_it_gave_up_when_the_link_heals() {
    let env = Arc::new(TestEnv::start(ROUTING).await);
    let (pg_port, _) = through(&env.database_url, 0);
    let proxy = TcpProxy::start(pg_port).await.unwrap();
    let (_, proxied) = through(&env.database_url, proxy.port());
    let mut s = env.settings("alone");
    s.conn.database_url = proxied;
    let alone = Replica::spawn(s);
    let stop = CancellationToken::new();
    let agent = agent(env.clone(), stop.clone());
    let before = submit(&env, "before", 3).await;
    eventually(T, "the work sent before the cut completed", || async { all_completed(&env, &before).await.then_some(()) }).await;

    proxy.cut();
    let during = submit(&env, "during", 10).await;
    // Long enough to stand down (2 s) with the entries read and given up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.heal();
    eventually(Duration::from_secs(20), "the work sent during the cut completed after the heal", || async {
        all_completed(&env, &during).await.then_some(())
    })
    .await;
    stop.cancel();
    agent.await.unwrap();
    alone.stop().await;
}
