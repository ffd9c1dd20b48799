//! Property: random bytes in every field of every input stream never wedge a replica. Each
//! entry ends either dead-lettered or applied, and ordinary work sent after them flows at once.
//! The seed is printed, so a failure can be replayed with `GE_TEST_SEED`.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{ROUTING, T, TestEnv, eventually};

const STREAMS: [&str; 3] = ["ge:work:incoming", "ge:work:completed", "ge:work:failed"];
const NAMES: [&str; 12] =
    ["wp_id", "agent_id", "work_type", "trigger", "lane", "depends_on", "payload", "dispatch_id", "result", "error", "retryable", "note"];

/// Bytes that stress PostgreSQL and the parsers: NUL, invalid UTF-8, quotes, commas, escapes,
/// long runs, or plain text that happens to be valid.
fn value(rng: &mut StdRng, known_wps: &[String]) -> Vec<u8> {
    match rng.random_range(0..9) {
        0 => vec![0u8],
        1 => {
            let mut v = b"text".to_vec();
            v.push(0);
            v.extend_from_slice(b"more");
            v
        }
        2 => (0..rng.random_range(1..40)).map(|_| rng.random::<u8>()).collect(),
        3 => "\\u0000\"',{}[]*?".as_bytes().to_vec(),
        4 => vec![b'a'; rng.random_range(100..5000)],
        5 => known_wps[rng.random_range(0..known_wps.len())].clone().into_bytes(),
        6 => format!("{}:1", known_wps[rng.random_range(0..known_wps.len())]).into_bytes(),
        7 => ["dolly", "ada", "implement", "true", "false", ""][rng.random_range(0..6)].as_bytes().to_vec(),
        _ => format!("r{}", rng.random::<u32>()).into_bytes(),
    }
}

fn entry(rng: &mut StdRng, known_wps: &[String]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut fields = Vec::new();
    for _ in 0..rng.random_range(1..6) {
        let name =
            if rng.random_range(0..8) == 0 { value(rng, known_wps) } else { NAMES[rng.random_range(0..NAMES.len())].as_bytes().to_vec() };
        fields.push((name, value(rng, known_wps)));
    }
    fields
}

async fn xadd(env: &TestEnv, stream: &str, fields: &[(Vec<u8>, Vec<u8>)]) -> String {
    let mut con = env.con.clone();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(k.as_slice()).arg(v.as_slice());
    }
    cmd.query_async(&mut con).await.expect("xadd")
}

#[tokio::test]
async fn random_bytes_in_every_field_never_wedge_a_replica() {
    let seed: u64 = std::env::var("GE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("GE_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");

    // Real work packages, so that random reports sometimes name one.
    let known: Vec<String> = (0..5).map(|i| format!("known-{i}")).collect();
    for wp in &known {
        env.submit(&[("wp_id", wp), ("agent_id", "dolly")]).await;
    }
    // Each entry's stream, id and wp_id field (the last one, as a replica reads it), kept here:
    // retention trims acknowledged entries from the streams while the test runs.
    let mut sent: Vec<(&str, String, Option<String>)> = Vec::new();
    for _ in 0..300 {
        let stream = STREAMS[rng.random_range(0..STREAMS.len())];
        let fields = entry(&mut rng, &known);
        let wp_id = fields.iter().rev().find(|(k, _)| k == b"wp_id").map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        sent.push((stream, xadd(&env, stream, &fields).await, wp_id));
    }
    // Ordinary work after the random entries must flow at once, whatever they were.
    let good: Vec<String> = (0..10).map(|i| format!("good-{i}")).collect();
    for wp in &good {
        env.submit(&[("wp_id", wp), ("agent_id", "turing")]).await;
    }
    eventually(T, "the good work packages dispatched after the random entries", || async {
        let got: HashSet<String> = env.triggers("turing").await.into_iter().map(|t| t["wp_id"].clone()).collect();
        good.iter().all(|w| got.contains(w)).then_some(())
    })
    .await;
    eventually(T, "every entry acknowledged", || async { (env.pending().await == 0).then_some(()) }).await;

    // Each random entry is dead-lettered, or it was applied: an incoming entry became a work
    // package of its own (or was a retry of one), a report named a real work package.
    let dead: HashSet<(String, String)> =
        env.deadletters().await.into_iter().map(|d| (d["stream"].clone(), d["source_id"].clone())).collect();
    let rows: HashMap<String, String> = sqlx::query_as::<_, (String, String)>("SELECT source_id, wp_id FROM work_packages")
        .fetch_all(&env.pool)
        .await
        .expect("work packages")
        .into_iter()
        .collect();
    let mut unaccounted = Vec::new();
    for (stream, id, wp_id) in &sent {
        if dead.contains(&(stream.to_string(), id.clone())) {
            continue;
        }
        let names_a_work_package = wp_id.as_ref().is_some_and(|w| rows.values().any(|r| r == w));
        let applied = match *stream {
            "ge:work:incoming" => rows.contains_key(id) || names_a_work_package,
            _ => names_a_work_package,
        };
        if !applied {
            unaccounted.push(format!("{stream} {id} wp_id {wp_id:?}"));
        }
    }
    assert!(unaccounted.is_empty(), "seed {seed}: entries neither dead-lettered nor applied:\n{}", unaccounted.join("\n"));
    assert!(dead.len() < sent.len(), "seed {seed}: some random entries are valid and must be taken, not all dead-lettered");
    replica.stop().await;
}
