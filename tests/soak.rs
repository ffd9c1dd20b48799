//! A short soak: 20,000 work packages through two replicas with a 5 s retention. It checks
//! what the long run in SOAK.md shows, without its timings: nothing lost, doubled or out of
//! order, and once the work is done, retention leaves no finished rows and the streams hold
//! no more than what readers still need (a trim removes whole stream nodes, 100 entries at
//! most, so a few may stay). The plateaus and throughput are timings: they live in SOAK.md.

use std::process::Command;

#[test]
fn a_short_soak_loses_nothing_and_retention_removes_what_it_finished() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("soak.json");
    let svg = dir.path().join("soak.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_ge-orchestrator"))
        .args(["soak", "--work-packages", "20000", "--rate", "1000", "--retention", "5s", "--retention-interval", "1s"])
        .args(["--sample", "2s", "--drain-timeout", "180s", "--json"])
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["work_packages"], 20_010, "blocks of 30");
    assert_eq!(r["completed"], r["work_packages"]);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicates"], 0);
    assert_eq!(r["out_of_order"].as_array().unwrap().len(), 0, "{}", r["out_of_order"]);
    assert_eq!(r["deadletters"], 0);
    assert_eq!(r["final_work_package_rows"], 0);
    assert_eq!(r["final_event_rows"], 0);
    assert_eq!(r["final_edge_rows"], 0);
    for s in r["final_stream_lengths"].as_array().unwrap() {
        assert!(s[1].as_u64().unwrap() <= 100, "{} holds more than one stream node after the drain: {}", s[0], s[1]);
    }
    let samples = r["samples"].as_array().unwrap();
    assert!(samples.len() >= 3 && samples.iter().all(|s| s["redis_mb"].as_f64().unwrap() > 0.0 && s["db_mb"].as_f64().unwrap() > 0.0));
    assert!(samples.iter().all(|s| s["rss_mb"].as_array().unwrap().iter().all(|m| m.as_f64().unwrap() > 0.0)), "RSS of each replica");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<polyline"), "a plot");
    assert!(stdout.contains("| t (s) |"), "the table:\n{stdout}");
}
