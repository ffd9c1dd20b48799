//! Routing and intake against real Redis and PostgreSQL: the priority of routes, the fields of
//! a trigger, each dead-letter reason, idempotent resubmission.

use std::time::Duration;

use crate::harness::{ROUTING, T, TestEnv, eventually};

#[tokio::test]
async fn routes_by_priority_and_passes_fields_through() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    let explicit = env
        .submit(&[("wp_id", "e1"), ("agent_id", "dolly"), ("work_type", "implement"), ("payload", "{\"x\":1}"), ("extra", "kept")])
        .await;
    env.submit(&[("wp_id", "w1"), ("work_type", "code_review"), ("trigger", "alert.disk")]).await;
    env.submit(&[("wp_id", "t1"), ("trigger", "github.pull_request.opened")]).await;
    env.submit(&[("wp_id", "t2"), ("work_type", "github.pull_request.closed")]).await;
    env.submit(&[("wp_id", "d1"), ("trigger", "nothing.matches")]).await;
    let auto = env.submit(&[("work_type", "code_review")]).await;

    let all = eventually(T, "six triggers", || async {
        let t = env.all_triggers().await;
        (t.len() == 6).then_some(t)
    })
    .await;
    let by = |wp: &str| all.iter().find(|t| t["wp_id"] == wp).unwrap_or_else(|| panic!("no trigger for {wp}: {all:?}")).clone();

    let e1 = by("e1");
    assert_eq!((e1["agent_id"].as_str(), e1["route"].as_str()), ("dolly", "explicit"), "agent_id beats work_type");
    assert_eq!(e1["payload"], "{\"x\":1}");
    assert_eq!(e1["extra"], "kept");
    assert_eq!(e1["attempt"], "1");
    assert_eq!(e1["dispatch_id"], "e1:1");
    assert_eq!(e1["source_id"], explicit);
    assert_eq!(e1["work_type"], "implement");

    let w1 = by("w1");
    assert_eq!((w1["agent_id"].as_str(), w1["route"].as_str()), ("turing", "work_type"), "work_type beats trigger");
    let t1 = by("t1");
    assert_eq!((t1["agent_id"].as_str(), t1["route"].as_str()), ("turing", "trigger"));
    let t2 = by("t2");
    assert_eq!((t2["agent_id"].as_str(), t2["route"].as_str()), ("turing", "trigger"), "work_type is the subject when trigger is absent");
    let d1 = by("d1");
    assert_eq!((d1["agent_id"].as_str(), d1["route"].as_str()), ("dolly", "default"));
    let a = by(&format!("auto-{auto}"));
    assert_eq!(a["agent_id"], "turing", "a missing wp_id is assigned from the entry id");
    assert!(env.deadletters().await.is_empty());
    replica.stop().await;
}

#[tokio::test]
async fn work_type_picks_the_least_loaded_agent_of_the_role() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    for i in 0..4 {
        env.submit(&[("wp_id", &format!("i{i}")), ("work_type", "implement")]).await;
    }
    let all = eventually(T, "four triggers", || async {
        let t = env.all_triggers().await;
        (t.len() == 4).then_some(t)
    })
    .await;
    let on = |a: &str| all.iter().filter(|t| t["agent_id"] == a).count();
    assert_eq!((on("ada"), on("turing")), (2, 2), "load is spread over the developers: {all:?}");
    replica.stop().await;
}

const NO_DEFAULT: &str = r#"version: 1
agents:
  ada: { roles: [developer] }
work_types:
  implement: developer
"#;

#[tokio::test]
async fn each_bad_entry_is_dead_lettered_with_its_reason() {
    let env = TestEnv::start(NO_DEFAULT).await;
    let replica = env.replica("r1");
    let invalid = env.submit(&[("wp_id", "../x"), ("work_type", "implement")]).await;
    let unknown = env.submit(&[("wp_id", "u1"), ("agent_id", "*")]).await;
    let unroutable = env.submit(&[("wp_id", "n1"), ("trigger", "nothing")]).await;
    env.submit(&[("wp_id", "c1"), ("work_type", "implement"), ("payload", "one")]).await;
    let conflict = env.submit(&[("wp_id", "c1"), ("work_type", "implement"), ("payload", "two")]).await;
    env.submit(&[("wp_id", "a"), ("work_type", "implement"), ("depends_on", "b")]).await;
    let cycle = env.submit(&[("wp_id", "b"), ("work_type", "implement"), ("depends_on", "a")]).await;
    let own = env.submit(&[("wp_id", "s"), ("work_type", "implement"), ("depends_on", "s")]).await;
    let unknown_wp = env.report("ge:work:completed", &[("wp_id", "never-submitted"), ("dispatch_id", "never-submitted:1")]).await;
    let no_wp = env.report("ge:work:failed", &[("error", "x")]).await;
    {
        let mut con = env.con.clone();
        let _: String = redis::cmd("XADD")
            .arg("ge:work:incoming")
            .arg("*")
            .arg("payload")
            .arg(&[0xffu8, 0xfe][..])
            .query_async(&mut con)
            .await
            .unwrap();
    }

    let dls = eventually(T, "nine dead letters", || async {
        let d = env.deadletters().await;
        (d.len() >= 9).then_some(d)
    })
    .await;
    // Entry ids are per stream, so the same id can appear in two streams.
    let reason_in = |stream: &str, id: &str| {
        let d = dls
            .iter()
            .find(|d| d["source_id"] == id && d["stream"] == stream)
            .unwrap_or_else(|| panic!("no dead letter for {id}: {dls:?}"));
        assert!(d["detail"].len() > 10, "a detail a person can act on: {d:?}");
        d["reason"].clone()
    };
    let reason_of = |id: &str| reason_in("ge:work:incoming", id);
    assert_eq!(reason_of(&invalid), "invalid");
    assert_eq!(reason_of(&unknown), "unknown_agent");
    assert_eq!(reason_of(&unroutable), "unroutable");
    assert_eq!(reason_of(&conflict), "conflict");
    assert_eq!(reason_of(&cycle), "cycle");
    assert_eq!(reason_of(&own), "cycle");
    assert_eq!(reason_in("ge:work:completed", &unknown_wp), "unknown_wp");
    assert_eq!(reason_in("ge:work:failed", &no_wp), "invalid");
    assert!(dls.iter().any(|d| d["reason"] == "invalid" && d["detail"].contains("UTF-8")), "{dls:?}");
    let conflict_dl = dls.iter().find(|d| d["source_id"] == conflict && d["stream"] == "ge:work:incoming").unwrap();
    assert_eq!(conflict_dl["payload"], "two", "the original fields travel with the dead letter");
    assert_eq!(conflict_dl["stream"], "ge:work:incoming");
    assert!(env.triggers("*").await.is_empty(), "no stream is created for an unknown agent name");

    eventually(T, "everything acknowledged", || async { (env.pending().await == 0).then_some(()) }).await;
    // The first c1 still went through; the conflicting one did not replace it. Acknowledged
    // does not mean published: a work package held for a round goes out with the next sweep.
    let c1 = eventually(T, "c1 dispatched", || async { env.triggers("ada").await.into_iter().find(|t| t["wp_id"] == "c1") }).await;
    assert_eq!(c1["payload"], "one");
    replica.stop().await;
}

#[tokio::test]
async fn resubmitting_the_same_work_package_is_a_no_op() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    let fields = [("wp_id", "same"), ("work_type", "implement"), ("payload", "p")];
    env.submit(&fields).await;
    env.submit(&fields).await;
    eventually(T, "both entries acknowledged", || async {
        (env.pending().await == 0 && env.status("same").await.as_deref() == Some("dispatched")).then_some(())
    })
    .await;
    // Give a second dispatch every chance to appear before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = env.all_triggers().await.iter().filter(|t| t["wp_id"] == "same").count();
    assert_eq!(n, 1, "one trigger for two identical submissions");
    assert!(env.deadletters().await.is_empty());
    // Even after completion, a retry of the producer changes nothing.
    let t = env.all_triggers().await.into_iter().find(|t| t["wp_id"] == "same").unwrap();
    env.complete(&t).await;
    eventually(T, "completed", || async { (env.status("same").await.as_deref() == Some("completed")).then_some(()) }).await;
    env.submit(&fields).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.status("same").await.as_deref(), Some("completed"));
    assert_eq!(env.all_triggers().await.len(), 1);
    replica.stop().await;
}
