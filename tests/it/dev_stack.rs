//! The README's first command, end to end: `dev` starts its own Redis and PostgreSQL, two
//! replica processes and the reference agents, and runs the sample plan to completion.

use crate::harness::dev_command;

#[test]
fn dev_runs_the_sample_plan_to_completion() {
    let logs = tempfile::tempdir().unwrap();
    let out = dev_command(logs.path(), "sleep 0.3; echo ok").env_remove("REDIS_URL").env_remove("DATABASE_URL").output().expect("run dev");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dev failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("9 completed, 0 failed"), "{stdout}");
    // (v1.6) The sample schedule, with its next firing.
    assert!(stdout.contains("schedule every-minute submits examples/scheduled.yaml once a minute; next firing "), "{stdout}");
    // The transitions were shown as they happened, lanes included.
    assert!(stdout.contains("[backend]") && stdout.contains("dispatched"), "{stdout}");
    let order: Vec<&str> = ["api-schema", "api-endpoint", "api-tests"]
        .iter()
        .map(|wp| {
            stdout
                .lines()
                .find(|l| l.contains(&format!(".{wp} ")) && l.contains("dispatched"))
                .unwrap_or_else(|| panic!("{wp} never dispatched: {stdout}"))
        })
        .collect();
    let at = |line: &str| line.split_whitespace().next().and_then(|t| t.trim_end_matches('s').parse::<f64>().ok()).unwrap();
    assert!(at(order[0]) <= at(order[1]) && at(order[1]) <= at(order[2]), "backend lane in order: {order:?}");
}
