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
