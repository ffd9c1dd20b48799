//! A few seconds of every benchmark workload, so the benchmark keeps working. It checks what
//! the benchmark counts — everything finished, nothing lost or doubled, every figure present —
//! and never how fast: timing goals live in BENCHMARKS.md.
//!
//! The peer workload runs BullMQ under Node.js, which scripts/setup.sh installs (as for the
//! browser test); the bench itself installs BullMQ from tools/peer's package-lock.json.

use std::process::Command;

#[test]
fn every_workload_runs_and_accounts_for_all_work() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    // The kill comes at a third of the takeover load; the survivors are stopped only once the
    // killed replica has left the group (its lease, 2 s, and a sweep, 0.5 s), however short
    // the load.
    let out = Command::new(env!("CARGO_BIN_EXE_ge-orchestrator"))
        .args(["bench", "--route", "2000", "--dag-plans", "30", "--rate", "300", "--takeover-load", "6s", "--timeout", "60s", "--json"])
        .arg(&json)
        // chains and peer run only when named.
        .args(["--workloads", "route,ceiling,dag,dag-paced,takeover,chains,capped,capped-controls,fair-wait,peer", "--chains", "30"])
        .args(["--capped", "2000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("route / ceiling"), "the table compares with the ceiling:\n{stdout}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "route",
            "ceiling",
            "dag",
            "dag-paced",
            "takeover",
            "chains",
            "capped",
            "capped-controls",
            "fair-wait",
            "bullmq-route",
            "bullmq-chains"
        ]
    );
    for r in runs {
        let w = r["workload"].as_str().unwrap();
        assert_eq!(r["finished"], r["work_packages"], "{w}: every work package accounted for");
        assert_eq!(r["lost"], 0, "{w}");
        assert_eq!(r["duplicates"], 0, "{w}");
        assert!(r["wp_per_s"].as_f64().unwrap() > 0.0, "{w}: a throughput");
    }
    let get = |w: &str| runs.iter().find(|r| r["workload"] == w).unwrap();
    assert_eq!(get("route")["ingest_to_trigger"]["count"], 2000, "a latency for every routed work package");
    // In each plan of 10, nine wait for something.
    assert_eq!(get("dag")["completion_to_dispatch"]["count"], 30 * 9);
    assert!(get("route")["peak_rss_mb"].as_array().unwrap().iter().all(|m| m.as_f64().unwrap() > 0.0), "RSS read for each replica");
    assert_eq!(get("chains")["work_packages"], 30 * 10, "chains of 10");
    assert_eq!(get("chains")["peak_rss_mb"].as_array().unwrap().len(), 2, "RSS of each replica");
    let takeover = &get("takeover")["takeover"];
    assert!(takeover["left_group_after_s"].is_number(), "the killed replica was taken over: {takeover}");
    assert!(report["route_ceiling_ratio"].is_number());
    assert!(report["controls_ratio"].is_number(), "capped-controls against capped");
    let fair = &get("fair-wait")["fair_wait"];
    assert!(fair["first_dispatch_s"].is_number() && fair["backlog_ready"].as_u64().unwrap() > 0, "a backlog and a wait: {fair}");
    assert_eq!(get("fair-wait")["work_packages"], 10, "the small plan");
    // The peer in the same shapes and sizes, compared in the same run.
    assert_eq!(get("bullmq-route")["work_packages"], 2000);
    assert_eq!(get("bullmq-route")["ingest_to_trigger"]["count"], 2000, "a latency for every job");
    assert_eq!(get("bullmq-chains")["work_packages"], 30 * 10, "flows of 10");
    assert_eq!(get("bullmq-chains")["completion_to_dispatch"]["count"], 30 * 9);
    let peer = report["peer"].as_array().unwrap();
    assert_eq!(peer.iter().map(|p| p["shape"].as_str().unwrap()).collect::<Vec<_>>(), ["route", "chains"]);
    assert!(peer.iter().all(|p| p["ratio"].as_f64().unwrap() > 0.0), "{peer:?}");
    assert!(stdout.contains("BullMQ") && stdout.contains("jobs/s"), "our figure over the peer's:\n{stdout}");
    assert_eq!(report["targets"].as_array().unwrap().len(), 11);
}

/// held-backlog, small: the free agent's work all goes behind a held backlog larger than a
/// round (1,500 for each held agent; the engine before the dispatch rebuild starved it and
/// the run said so), and the pause and the cap hold.
#[test]
fn the_free_agent_is_never_held_back_by_a_held_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    // 1,500 per held agent: more than a round of today's engine reads (1,000 ready rows), so
    // the starvation of issue 18 shows at this size too.
    let out = Command::new(env!("CARGO_BIN_EXE_ge-orchestrator"))
        .args(["bench", "--workloads", "held-backlog", "--held", "1500", "--free", "100", "--free-rate", "200", "--timeout", "60s"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let report: serde_json::Value = match std::fs::read(&json) {
        Ok(b) => serde_json::from_slice(&b).unwrap(),
        Err(e) => panic!("no report ({e}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
    };
    let run = &report["runs"][0];
    let h = &run["held_backlog"];
    assert_eq!(run["workload"], "held-backlog");
    assert_eq!(h["backlog"], 3000, "1,500 for each held agent");
    assert_eq!(h["held_dispatched"], 0, "the paused agent got nothing: {h}");
    assert_eq!(h["full_dispatched"], 1, "the full agent got its one: {h}");
    assert_eq!(h["baseline_finished"], 100, "with no backlog everything went: {h}");
    assert_eq!(h["baseline"]["count"], 90, "nine steps of each chain of 10 wait for a completion");
    assert_eq!(run["duplicates"], 0);
    assert_eq!(h["starved"], false, "the free agent starved behind the backlog:\n{stdout}");
    assert!(out.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run["finished"], 100, "{run}");
    assert_eq!(run["completion_to_dispatch"]["count"], 90);
}
