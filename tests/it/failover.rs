//! Failovers of what the replicas stand on (issue 12): a Redis master killed and replaced by
//! the Sentinels, a PostgreSQL primary killed and its synchronous standby promoted behind a
//! switched endpoint, with two replicas under load and reference agents that know only the
//! Sentinels. Nothing is lost or doubled, order holds; and a trigger is recorded as published
//! only once a Redis replica has it.

use std::collections::HashMap;
use std::time::Duration;

use ge_orchestrator::engine::settings::RunSettings;
use ge_orchestrator::engine::streams::{self, MasterConnection};
use ge_orchestrator::tools::localstack::{LocalRedis, RedisOptions};
use ge_orchestrator::tools::topology::{PostgresHa, RedisHa};
use sqlx::PgPool;

use crate::harness::{BIN, ROUTING, Replica, T, TestEnv, dev_command, eventually};

const AGENTS: [&str; 2] = ["w1", "w2"];
const HA_ROUTING: &str = "version: 1
agents:
  w1: { roles: [worker] }
  w2: { roles: [worker] }
work_types:
  build: worker
default_agent: w1
retry: { max_attempts: 3, backoff: { initial: 200ms, factor: 2, max: 2s } }
";

/// What a producer does for its entry to survive a failover: XADD, then WAIT for a replica,
/// and XADD again (the same wp_id and fields: a no-op for the orchestrator) until one has it.
async fn submit_durably(con: &mut MasterConnection, fields: &[(String, String)]) {
    eventually(T, "an incoming entry confirmed by a Redis replica", || {
        let mut con = con.clone();
        async move {
            streams::xadd(&mut con, "ge:work:incoming", None, fields).await.ok()?;
            let acked = streams::wait_for_replicas(&mut con, 1, Duration::from_secs(1)).await.ok()?;
            (acked >= 1).then_some(())
        }
    })
    .await
}

/// Plans of five: three in a lane shared by all plans, two depending on the first.
async fn submit_plans(mut con: MasterConnection, prefix: &'static str, plans: usize) -> Vec<String> {
    let mut wps = Vec::new();
    for p in 0..plans {
        for i in 0..5 {
            let wp = format!("{prefix}{p}.{i}");
            let mut fields = vec![("wp_id".to_string(), wp.clone()), ("work_type".to_string(), "build".to_string())];
            match i {
                0..=2 => fields.push(("lane".into(), "L".into())),
                _ => fields.push(("depends_on".into(), format!("{prefix}{p}.0"))),
            }
            submit_durably(&mut con, &fields).await;
            wps.push(wp);
        }
    }
    wps
}

fn settings(redis_url: &str, database_url: &str, config: std::path::PathBuf, consumer: &str) -> RunSettings {
    let mut s = RunSettings::new(redis_url.to_string(), database_url.to_string(), config);
    s.consumer = Some(consumer.to_string());
    s.block = Duration::from_millis(200);
    s.scheduler_interval = Duration::from_millis(100);
    s.health_interval = Duration::from_secs(1);
    s.republish_after = Duration::from_secs(1);
    s.db_pool = 4;
    s
}

async fn completed(pool: &PgPool, wps: &[String]) -> bool {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE wp_id = ANY($1) AND status = 'completed'")
        .bind(wps)
        .fetch_one(pool)
        .await
        .unwrap_or(0);
    n == wps.len() as i64
}

#[tokio::test]
async fn work_survives_a_redis_and_a_postgres_failover_with_nothing_lost_or_doubled() {
    let mut redis = RedisHa::start().await.expect("start Redis with Sentinels");
    let mut pg = PostgresHa::start().await.expect("start PostgreSQL with a synchronous standby");
    let database_url = pg.create_database("orchestrator").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routing.yaml");
    std::fs::write(&config, HA_ROUTING).unwrap();
    let url = redis.url();
    let replicas: Vec<Replica> = ["r1", "r2"].iter().map(|c| Replica::spawn(settings(&url, &database_url, config.clone(), c))).collect();
    let mut agents = Vec::new();
    for a in AGENTS {
        let child = tokio::process::Command::new(BIN)
            .args(["agent", a, "--claim-idle", "2s", "--", "true"])
            .env("REDIS_URL", &url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start an agent");
        agents.push(child);
    }
    let pool =
        eventually(T, "the database through the proxy", || async { ge_orchestrator::engine::store::connect(&database_url, 2).await.ok() })
            .await;
    let mut con = streams::connect(&url).await.expect("connect through the Sentinels");
    let mut all = submit_plans(con.clone(), "a", 4).await;

    // The Redis master dies with work in flight; more work arrives while the Sentinels fail
    // over, and is confirmed once the old master is back as the new one's replica.
    let old = redis.kill_master().await.unwrap();
    let during = tokio::spawn(submit_plans(con.clone(), "b", 4));
    let new = redis.wait_promoted(old, T).await.unwrap();
    assert_ne!(new, old);
    redis.restart(old).await.unwrap();
    all.extend(during.await.unwrap());
    all.extend(submit_plans(con.clone(), "c", 4).await);
    eventually(T, "every work package completed after the Redis failover", || async { completed(&pool, &all).await.then_some(()) }).await;

    // The PostgreSQL primary dies with work in flight; the standby is promoted, the endpoint moves.
    all.extend(submit_plans(con.clone(), "d", 4).await);
    pg.fail_over().await.unwrap();
    all.extend(submit_plans(con.clone(), "e", 4).await);
    eventually(T, "every work package completed after the PostgreSQL failover", || async { completed(&pool, &all).await.then_some(()) })
        .await;

    // No dispatch_id twice in any trigger stream of the master now in charge.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for a in AGENTS {
        let v: redis::Value = redis::cmd("XRANGE").arg(format!("triggers.{a}")).arg("-").arg("+").query_async(&mut con).await.unwrap();
        for e in streams::parse_entries(&v) {
            let d = e.fields.unwrap_or_default().into_iter().find(|(k, _)| k == b"dispatch_id").map(|(_, v)| v).unwrap_or_default();
            *seen.entry(String::from_utf8_lossy(&d).into_owned()).or_default() += 1;
        }
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "dispatch_ids published twice: {doubled:?}");
    // Not every trigger need be in these streams: one an agent read from the old master just
    // before it died, and ran, is lost with it unless replicated. Its work package completed
    // once all the same, which is what the checks above and below hold to.
    // Order: each dispatch of a work package came after its lane predecessor and its
    // dependency completed, by the history PostgreSQL recorded.
    let early: Vec<(String, String)> = sqlx::query_as(
        "WITH first_dispatch AS (SELECT wp_id, min(at) AS at FROM work_package_events WHERE status = 'dispatched' GROUP BY wp_id),
              done AS (SELECT wp_id, min(at) AS at FROM work_package_events WHERE status = 'completed' GROUP BY wp_id)
         SELECT d.wp_id, d.depends_on FROM work_package_deps d
           JOIN first_dispatch f ON f.wp_id = d.wp_id LEFT JOIN done c ON c.wp_id = d.depends_on
          WHERE c.at IS NULL OR f.at < c.at
         UNION ALL
         SELECT w.wp_id, p.wp_id FROM work_packages w JOIN work_packages p ON p.lane = w.lane AND p.source_id < w.source_id
           JOIN first_dispatch f ON f.wp_id = w.wp_id LEFT JOIN done c ON c.wp_id = p.wp_id
          WHERE c.at IS NULL OR f.at < c.at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(early.is_empty(), "dispatched before what they wait for: {early:?}");
    let deps: i64 = sqlx::query_scalar("SELECT count(*) FROM work_package_deps").fetch_one(&pool).await.unwrap();
    assert_eq!(deps, 40, "the dependencies the check went over");

    for r in replicas {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_trigger_is_recorded_as_published_only_once_a_redis_replica_has_it() {
    let env = TestEnv::start(ROUTING).await;
    let mut s = env.settings("r1");
    s.redis_wait_replicas = Some(1);
    s.redis_wait_timeout = Duration::from_millis(200);
    s.republish_after = Duration::from_millis(500);
    let replica = Replica::spawn(s);
    env.submit(&[("wp_id", "a"), ("agent_id", "dolly")]).await;
    eventually(T, "the trigger of a", || async { env.triggers("dolly").await.into_iter().find(|t| t["wp_id"] == "a") }).await;

    // No replica: published again and again, never recorded, never doubled.
    let pool = env.pool.clone();
    let published = move |wp: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT NOT EXISTS (SELECT 1 FROM dispatch_outbox WHERE wp_id = $1)")
                .bind(wp)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!published("a").await, "recorded as published without a replica's acknowledgement");
    assert_eq!(env.triggers("dolly").await.len(), 1, "republished without doubling");

    // A replica attaches: the next republication is confirmed and recorded.
    let replica_redis = LocalRedis::start(RedisOptions::default()).await.unwrap();
    let mut rcon = streams::manager(&redis::Client::open(replica_redis.url()).unwrap()).await.unwrap();
    let _: () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(env.redis.port()).query_async(&mut rcon).await.unwrap();
    eventually(T, "the publication confirmed", || async { published("a").await.then_some(()) }).await;
    assert_eq!(env.triggers("dolly").await.len(), 1);
    let on_replica: Vec<redis::Value> = redis::cmd("XRANGE").arg("triggers.dolly").arg("-").arg("+").query_async(&mut rcon).await.unwrap();
    assert_eq!(on_replica.len(), 1, "the replica holds the trigger");
    replica.stop().await;
}

#[test]
fn dev_runs_with_only_the_sentinels_addresses() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let redis = rt.block_on(RedisHa::start()).expect("start Redis with Sentinels");
    let logs = tempfile::tempdir().unwrap();
    let out = dev_command(logs.path(), "echo ok").env("REDIS_URL", redis.url()).env_remove("DATABASE_URL").output().expect("run dev");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dev failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("9 completed, 0 failed"), "{stdout}");
    let log = std::fs::read_to_string(logs.path().join("replica-1.log")).unwrap_or_default();
    assert!(log.contains("Redis master found through Sentinel"), "{log}");
    drop(redis);
}
