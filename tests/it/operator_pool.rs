//! Operators cannot starve the engine: their reads (admin API, /metrics, the dashboard) have
//! a small PostgreSQL pool of their own, and every statement of a replica has a time limit.
//!
//! A slow read is made by shadowing `starts_with`, which only the work-package listing's
//! `prefix` filter calls: sessions opened after `slow_prefix_reads` find a `public.starts_with`
//! that sleeps before the built-in one.

use std::time::{Duration, Instant};

use crate::harness::{ROUTING, Replica, T, TestEnv, eventually, http, http_settings, wait_ready};

async fn slow_prefix_reads(env: &TestEnv, seconds: u32) {
    // One work package, so that the filter has a row to call the function on.
    let seeder = env.replica("seeder");
    env.submit(&[("wp_id", "seed"), ("agent_id", "dolly")]).await;
    eventually(T, "seed dispatched", || async { (env.status("seed").await.as_deref() == Some("dispatched")).then_some(()) }).await;
    seeder.stop().await;
    // The seconds are this test's own number; the database name comes from PostgreSQL.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION public.starts_with(a text, b text) RETURNS boolean LANGUAGE plpgsql
         AS $$ BEGIN PERFORM pg_sleep({seconds}); RETURN pg_catalog.starts_with(a, b); END $$"
    )))
    .execute(&env.pool)
    .await
    .unwrap();
    let db: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&env.pool).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE \"{db}\" SET search_path = public, pg_catalog")))
        .execute(&env.pool)
        .await
        .unwrap();
}

/// Drops the sleeping function and cancels the reads still sleeping in it.
async fn end_slow_reads(env: &TestEnv) {
    sqlx::query("DROP FUNCTION public.starts_with(text, text)").execute(&env.pool).await.unwrap();
    eventually(T, "no read sleeping", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        (n == 0).then_some(())
    })
    .await;
}

/// Sessions of this test's database sleeping in the shadowed `starts_with`.
async fn sleeping(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT coalesce(application_name, '') FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// A slow read is answered 503 within a few seconds, saying `why`.
async fn slow_read_answered_503(port: u16, why: &str) {
    let start = Instant::now();
    let (code, v) = http(port, "GET", "/api/work-packages?prefix=seed", None, None).await;
    assert_eq!(code, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains(why), "{v}");
    assert!(start.elapsed() < Duration::from_secs(5), "answered after {:?}", start.elapsed());
}

#[tokio::test]
async fn slow_operator_reads_leave_the_engine_its_connections() {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::start(ROUTING).await;
    slow_prefix_reads(&env, 60).await;
    let (settings, port) = http_settings(&env, "iso-1", None);
    let replica = Replica::spawn(settings);
    wait_ready(port).await;

    // Ten operators ask for a listing that takes a minute; none of them waits for the answer.
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET /api/work-packages?prefix=seed HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        clients.push(s);
    }
    eventually(T, "reads sleeping in PostgreSQL", || async { (sleeping(&env).await.len() >= 2).then_some(()) }).await;

    // The engine routes at once all the same.
    let start = Instant::now();
    env.submit(&[("wp_id", "meanwhile"), ("agent_id", "dolly")]).await;
    eventually(Duration::from_secs(5), "meanwhile dispatched while the reads sleep", || async {
        (env.status("meanwhile").await.as_deref() == Some("dispatched")).then_some(())
    })
    .await;
    let asleep = sleeping(&env).await;
    assert_eq!(asleep, ["ge-orchestrator-ops", "ge-orchestrator-ops"], "two connections of the operators' pool, no more");
    println!("dispatched in {:?} beside {} sleeping reads", start.elapsed(), asleep.len());

    drop(clients);
    end_slow_reads(&env).await;
    replica.stop().await;
}

/// `GE_STATEMENT_TIMEOUT` ends a statement that runs too long, on the operators' connections
/// (the read answers 503) and on the engine's (the ingest fails, is logged and retried).
#[tokio::test]
async fn the_statement_timeout_ends_slow_statements_of_operators_and_engine() {
    let env = TestEnv::start(ROUTING).await;
    slow_prefix_reads(&env, 60).await;
    let log = env.dir.path().join("replica.log");
    let (mut child, port) = env.serve_process("iso-2", &[("GE_STATEMENT_TIMEOUT", "1s")], Some(&log)).await;
    slow_read_answered_503(port, "statement timeout").await;

    // The engine's ingest waits on a lock longer than the limit: it fails, and goes through
    // once the lock is gone.
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE work_packages IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    env.submit(&[("wp_id", "after-lock"), ("agent_id", "dolly")]).await;
    eventually(T, "the engine's statement cancelled by the timeout", || async {
        std::fs::read_to_string(&log).unwrap().contains("canceling statement due to statement timeout").then_some(())
    })
    .await;
    lock.commit().await.unwrap();
    eventually(T, "after-lock dispatched", || async { (env.status("after-lock").await.as_deref() == Some("dispatched")).then_some(()) })
        .await;

    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    assert!(child.wait().await.unwrap().success());
    end_slow_reads(&env).await;
}

/// A request that takes longer than `GE_HTTP_REQUEST_TIMEOUT` is answered 503 then, whatever
/// it still waits for.
#[tokio::test]
async fn a_request_is_answered_within_the_request_timeout() {
    let env = TestEnv::start(ROUTING).await;
    slow_prefix_reads(&env, 60).await;
    let (_replica, port) = env.serve_process("iso-3", &[("GE_HTTP_REQUEST_TIMEOUT", "1s")], None).await;
    slow_read_answered_503(port, "took longer than 1s").await;
    end_slow_reads(&env).await;
}
