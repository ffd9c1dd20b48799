//! A few seconds of every benchmark workload, so the benchmark keeps working. It checks what
//! the benchmark counts — everything finished, nothing lost or doubled, every figure present —
//! and never how fast: timing goals live in BENCHMARKS.md.

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
        // chains runs only when named.
        .args(["--workloads", "route,ceiling,dag,dag-paced,takeover,chains,capped,capped-controls,fair-wait", "--chains", "30"])
        .args(["--capped", "2000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("route / ceiling"), "the table compares with the ceiling:\n{stdout}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(names, ["route", "ceiling", "dag", "dag-paced", "takeover", "chains", "capped", "capped-controls", "fair-wait"]);
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
    assert_eq!(report["targets"].as_array().unwrap().len(), 8);
}
