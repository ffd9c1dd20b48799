//! One bad entry never stops the rest: an entry PostgreSQL refuses is found by splitting its
//! batch and is dead-lettered alone; NUL bytes are refused in work and kept out of reports.

use std::collections::HashSet;

use crate::harness::{ROUTING, T, TestEnv, eventually};

#[tokio::test]
async fn an_entry_the_database_refuses_is_dead_lettered_alone_and_its_batch_mates_go_through() {
    let env = TestEnv::start(ROUTING).await;
    // Stands for any refusal caused by what one entry holds: the database rejects this wp_id.
    sqlx::query("ALTER TABLE work_packages ADD CONSTRAINT test_refuses_evil CHECK (wp_id <> 'evil')")
        .execute(&env.pool)
        .await
        .expect("add the constraint");
    // All in the stream before the replica starts, so they arrive in one batch.
    let mut good = Vec::new();
    let mut evil_id = String::new();
    for i in 0..20 {
        if i == 7 {
            evil_id = env.submit(&[("wp_id", "evil"), ("agent_id", "dolly")]).await;
        }
        let wp = format!("mate-{i}");
        env.submit(&[("wp_id", &wp), ("agent_id", "dolly")]).await;
        good.push(wp);
    }
    let replica = env.replica("r1");

    eventually(T, "every batch-mate dispatched", || async {
        let got: HashSet<String> = env.triggers("dolly").await.into_iter().map(|t| t["wp_id"].clone()).collect();
        good.iter().all(|w| got.contains(w)).then_some(())
    })
    .await;
    let dl = eventually(T, "the refused entry dead-lettered", || async {
        env.deadletters().await.into_iter().find(|d| d["source_id"] == evil_id)
    })
    .await;
    assert_eq!(dl["reason"], "invalid");
    assert!(dl["detail"].contains("PostgreSQL refused") && dl["detail"].contains("test_refuses_evil"), "{dl:?}");
    assert_eq!(env.deadletters().await.len(), 1, "only the entry at fault is dead-lettered");
    eventually(T, "everything acknowledged", || async { (env.pending().await == 0).then_some(()) }).await;
    replica.stop().await;
}

#[tokio::test]
async fn nul_bytes_are_refused_in_work_and_replaced_in_reports() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    let bad = env.submit(&[("wp_id", "nul-payload"), ("agent_id", "dolly"), ("payload", "a\0b")]).await;
    env.submit(&[("wp_id", "ok"), ("agent_id", "dolly")]).await;
    let dl =
        eventually(T, "the NUL payload dead-lettered", || async { env.deadletters().await.into_iter().find(|d| d["source_id"] == bad) })
            .await;
    assert_eq!(dl["reason"], "invalid");
    assert!(dl["detail"].contains("NUL byte") && dl["detail"].contains("payload"), "{dl:?}");

    let trigger = eventually(T, "ok dispatched", || async { env.triggers("dolly").await.into_iter().find(|t| t["wp_id"] == "ok") }).await;
    env.report("ge:work:completed", &[("wp_id", "ok"), ("dispatch_id", &trigger["dispatch_id"]), ("result", "line\0next")]).await;
    eventually(T, "ok completed despite the NUL in its result", || async {
        (env.status("ok").await.as_deref() == Some("completed")).then_some(())
    })
    .await;
    let result: String =
        sqlx::query_scalar("SELECT result FROM work_packages WHERE wp_id = 'ok'").fetch_one(&env.pool).await.expect("result");
    assert_eq!(result, "line\u{FFFD}next");
    replica.stop().await;
}
