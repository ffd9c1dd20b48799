//! Random and hostile entries at a running replica: each is dead-lettered with a reason (or,
//! when it happens to be valid, taken as work), nothing panics, nothing stays pending, and
//! ordinary traffic keeps flowing.

use std::collections::HashMap;

use rand::Rng;

use crate::harness::{ROUTING, T, TestEnv, eventually};

async fn xadd_raw(env: &TestEnv, fields: &[(Vec<u8>, Vec<u8>)]) -> String {
    let mut con = env.con.clone();
    let mut cmd = redis::cmd("XADD");
    cmd.arg("ge:work:incoming").arg("*");
    for (k, v) in fields {
        cmd.arg(k.as_slice()).arg(v.as_slice());
    }
    cmd.query_async(&mut con).await.expect("xadd")
}

fn f(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
    (k.as_bytes().to_vec(), v.as_bytes().to_vec())
}

#[tokio::test]
async fn hostile_entries_are_dead_lettered_and_traffic_flows() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    let big = "x".repeat(10 * 1024);
    let deps: String = (0..10_000).map(|i| format!("d{i}")).collect::<Vec<_>>().join(",");
    let huge_payload = "p".repeat((1 << 20) + 1);
    let cases: Vec<(&str, ge_orchestrator::core::entry::RawFields)> = vec![
        ("invalid", vec![f("wp_id", "")]),
        ("invalid", vec![f("wp_id", &big)]),
        ("invalid", vec![f("wp_id", "a b")]),
        ("invalid", vec![f("wp_id", "h1"), f("depends_on", &deps)]),
        ("invalid", vec![f("wp_id", "h2"), f("payload", &huge_payload)]),
        ("invalid", vec![f("wp_id", "h3"), f("note", &"n".repeat(70 * 1024))]),
        ("invalid", vec![(b"wp_id".to_vec(), vec![0xc3, 0x28])]),
        ("invalid", vec![(vec![0xff, 0xfe], b"v".to_vec())]),
        ("invalid", vec![f("wp_id", "h4"), f("depends_on", "ok,../x")]),
        ("cycle", vec![f("wp_id", "h5"), f("depends_on", "h5")]),
        ("unknown_agent", vec![f("wp_id", "h6"), f("agent_id", "../x")]),
        ("unknown_agent", vec![f("wp_id", "h7"), f("agent_id", "*")]),
        ("unknown_agent", vec![f("wp_id", "h8"), f("agent_id", "a b")]),
        ("unknown_agent", vec![f("wp_id", "h9"), f("agent_id", &big)]),
        ("invalid", vec![f("wp_id", "h10"), f("lane", &big)]),
    ];
    // A cycle through three work packages: the edge that closes it is refused.
    env.submit(&[("wp_id", "c1"), ("agent_id", "dolly"), ("depends_on", "c3")]).await;
    env.submit(&[("wp_id", "c2"), ("agent_id", "dolly"), ("depends_on", "c1")]).await;
    let closing = env.submit(&[("wp_id", "c3"), ("agent_id", "dolly"), ("depends_on", "c2")]).await;

    let mut expected: HashMap<String, &str> = HashMap::new();
    let mut normal = Vec::new();
    let mut random = Vec::new();
    let mut rng = rand::rng();
    for round in 0..20 {
        for (reason, fields) in &cases {
            expected.insert(xadd_raw(&env, fields).await, reason);
        }
        // Random bytes in random fields.
        for _ in 0..10 {
            let n = rng.random_range(1..4);
            let fields: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
                .map(|_| {
                    let keys = ["wp_id", "agent_id", "work_type", "trigger", "lane", "depends_on", "payload", "x"];
                    let k = keys[rng.random_range(0..keys.len())].as_bytes().to_vec();
                    let len = rng.random_range(0..40);
                    (k, (0..len).map(|_| rng.random::<u8>()).collect())
                })
                .collect();
            random.push(xadd_raw(&env, &fields).await);
        }
        let wp = format!("normal-{round}");
        env.submit(&[("wp_id", &wp), ("agent_id", "dolly")]).await;
        normal.push(wp);
    }
    expected.insert(closing, "cycle");

    // Ordinary traffic went through all along.
    for wp in &normal {
        eventually(T, &format!("{wp} dispatched"), || async { (env.status(wp).await.as_deref() == Some("dispatched")).then_some(()) })
            .await;
    }
    eventually(T, "nothing pending", || async { (env.pending().await == 0).then_some(()) }).await;
    let dls = env.deadletters().await;
    let by_id: HashMap<&str, &HashMap<String, String>> = dls.iter().map(|d| (d["source_id"].as_str(), d)).collect();
    for (id, reason) in &expected {
        let d = by_id.get(id.as_str()).unwrap_or_else(|| panic!("{id} ({reason}) was not dead-lettered"));
        assert_eq!(d["reason"], *reason, "{id}: {}", d["detail"]);
        assert!(!d["detail"].is_empty());
        assert!(d["detail"].len() < 1000, "details stay readable: {} bytes", d["detail"].len());
    }
    // Each random entry either became work or was dead-lettered with a reason.
    let wps: Vec<String> = sqlx::query_scalar("SELECT source_id FROM work_packages").fetch_all(&env.pool).await.unwrap();
    for id in &random {
        assert!(by_id.get(id.as_str()).is_some_and(|d| !d["reason"].is_empty()) || wps.contains(id), "random entry {id} vanished");
    }
    replica.stop().await;
}

/// An oversized entry is dead-lettered with each value cut to `--deadletter-value-bytes`
/// (4 KiB by default) and at most `--max-fields` fields, the full size and SHA-256 of each cut
/// value recorded beside it; such a dead letter cannot be requeued, since it no longer holds
/// what it would send.
#[tokio::test]
async fn oversized_entries_are_dead_lettered_cut_and_cannot_be_requeued() {
    use crate::harness::{http, http_settings, wait_ready};
    const TOKEN: &str = "hostile-token";
    let env = TestEnv::start(ROUTING).await;
    let (settings, port) = http_settings(&env, "r1", Some(TOKEN));
    let replica = crate::harness::Replica::spawn(settings);
    wait_ready(port).await;

    let huge = "é".repeat(300_000) + "x"; // 600,001 bytes, over the 64 KiB of a field
    let huge_id = xadd_raw(&env, &[f("wp_id", "big-1"), f("note", &huge), f("cut.note.bytes", "forged")]).await;
    let many: Vec<(Vec<u8>, Vec<u8>)> = (0..1000).map(|i| f(&format!("k{i}"), "v")).collect();
    let many_id = xadd_raw(&env, &many).await;
    let small_id = xadd_raw(&env, &[f("wp_id", "small-1"), f("agent_id", "ghost")]).await;
    let dls = eventually(T, "three dead letters", || async {
        let d = env.deadletters().await;
        (d.len() == 3).then_some(d)
    })
    .await;
    let by_source = |id: &str| dls.iter().find(|d| d["source_id"] == id).unwrap().clone();

    let big = by_source(&huge_id);
    assert!(big["note"].len() <= 4096 && huge.starts_with(&big["note"]), "the value cut at a character boundary");
    assert_eq!(big["cut.note.bytes"], huge.len().to_string());
    let digest = ring::digest::digest(&ring::digest::SHA256, huge.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(big["cut.note.sha256"], hex);
    assert_eq!(big["original.cut.note.bytes"], "forged", "an original field named like the record is kept apart");
    assert_eq!(big["reason"], "invalid");

    let many_dl = by_source(&many_id);
    let kept = many_dl.keys().filter(|k| k.starts_with('k')).count();
    assert_eq!(kept, 256, "at most --max-fields original fields");
    assert_eq!(many_dl["cut.fields"], "744");

    // The API shows what was cut; a requeue of a cut dead letter is refused, the rest goes.
    let (code, listed) = http(port, "GET", "/api/deadletters", None, None).await;
    assert_eq!(code, 200);
    let listed_big = listed.as_array().unwrap().iter().find(|d| d["source_id"] == huge_id.as_str()).unwrap().clone();
    assert_eq!(listed_big["cut"]["note"]["bytes"], huge.len() as u64);
    assert_eq!(listed_big["cut"]["note"]["sha256"], hex.as_str());
    assert_eq!(listed_big["fields"]["cut.note.bytes"], "forged");
    let listed_many = listed.as_array().unwrap().iter().find(|d| d["source_id"] == many_id.as_str()).unwrap().clone();
    assert_eq!(listed_many["dropped_fields"], 744);

    let (code, v) = http(port, "POST", &format!("/api/deadletters/{}/requeue", big["_id"]), Some(TOKEN), None).await;
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cut"), "{v}");
    let (code, v) = http(port, "POST", "/api/deadletters/requeue", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["requeued"], 1, "only the dead letter that was not cut: {v}");
    let outcomes: Vec<&str> = v["results"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "cut").count(), 2, "{v}");
    let left: Vec<String> = env.deadletters().await.iter().map(|d| d["source_id"].clone()).collect();
    assert!(left.contains(&huge_id) && left.contains(&many_id), "cut dead letters stay: {left:?}");
    let _ = small_id;
    replica.stop().await;
}

/// Stream ids are two unsigned 64-bit numbers, and a producer may set one by hand: after
/// `18446744073709551615-0`, the largest millisecond part, Redis gives every later entry that
/// part. Every such entry is still taken as work, and a lane keeps its order across the jump.
#[tokio::test]
async fn the_largest_stream_id_stops_no_ingest_and_keeps_lane_order() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    env.submit(&[("wp_id", "before"), ("agent_id", "dolly"), ("lane", "L")]).await;
    let before = trigger(&env, "before").await;
    let mut con = env.con.clone();
    let _: String = redis::cmd("XADD")
        .arg("ge:work:incoming")
        .arg("18446744073709551615-0")
        .arg("wp_id")
        .arg("evil")
        .arg("agent_id")
        .arg("dolly")
        .query_async(&mut con)
        .await
        .expect("xadd with the largest id");
    let after = env.submit(&[("wp_id", "after"), ("agent_id", "dolly"), ("lane", "L")]).await;
    assert!(after.starts_with("18446744073709551615-"), "{after}");
    env.submit(&[("wp_id", "free"), ("agent_id", "dolly")]).await;

    for wp in ["evil", "after", "free"] {
        let outcome = eventually(T, &format!("{wp} taken or dead-lettered"), || async {
            if let Some(d) = env.deadletters().await.into_iter().find(|d| d.get("wp_id").map(String::as_str) == Some(wp)) {
                return Some(format!("dead-lettered {}: {}", d["reason"], d["detail"]));
            }
            env.status(wp).await
        })
        .await;
        assert!(!outcome.starts_with("dead-lettered"), "{wp}: {outcome}");
    }
    trigger(&env, "evil").await;
    trigger(&env, "free").await;
    assert_eq!(env.status("after").await.as_deref(), Some("blocked"), "after waits for before, earlier in its lane");
    env.complete(&before).await;
    trigger(&env, "after").await;
    eventually(T, "nothing pending", || async { (env.pending().await == 0).then_some(()) }).await;
    replica.stop().await;
}

async fn trigger(env: &TestEnv, wp: &str) -> HashMap<String, String> {
    eventually(T, &format!("the trigger of {wp}"), || async { env.triggers("dolly").await.into_iter().find(|t| t["wp_id"] == wp) }).await
}
