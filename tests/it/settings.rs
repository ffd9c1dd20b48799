//! Settings that cannot work are refused at start-up with an error naming the flag, before
//! anything connects or any loop starts: a zero period panicked inside a loop's task (the
//! replica went on without it), a zero size made Redis or the pool misbehave.

use std::process::Stdio;
use std::time::Duration;

use ge_orchestrator::engine::settings::RunSettings;
use tokio_util::sync::CancellationToken;

use crate::harness::{ROUTING, TestEnv};

/// Runs `ge-orchestrator run` against `env` with `vars` added; (exit status, stderr), or None
/// when it was still running after a few seconds (it accepted the settings).
async fn run_binary(env: &TestEnv, vars: &[(&str, &str)]) -> Option<(std::process::ExitStatus, String)> {
    let mut cmd = env.run_command("settings-1", &["--http-addr", "off"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start ge-orchestrator run");
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.ok()?.expect("wait for the replica");
    Some((out.status, String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[tokio::test]
async fn the_binary_refuses_a_zero_period_and_a_lease_refreshed_slower_than_it_lives() {
    let env = TestEnv::start(ROUTING).await;
    for (vars, names) in [
        (vec![("GE_LEASE_REFRESH", "0s")], vec!["--lease-refresh"]),
        (vec![("GE_SCHEDULER_INTERVAL", "0ms")], vec!["--scheduler-interval"]),
        (vec![("GE_LEASE_REFRESH", "3s"), ("GE_LEASE_TTL", "2s")], vec!["--lease-refresh", "--lease-ttl"]),
        (vec![("GE_BATCH_SIZE", "0")], vec!["--batch-size", "GE_BATCH_SIZE"]),
        (vec![("GE_DB_POOL", "0")], vec!["--db-pool", "GE_DB_POOL"]),
    ] {
        let (status, stderr) = run_binary(&env, &vars).await.unwrap_or_else(|| panic!("{vars:?} was accepted: the replica kept running"));
        assert!(!status.success(), "{vars:?}: exit {status}");
        for name in names {
            assert!(stderr.contains(name), "{vars:?}: the error names {name}:\n{stderr}");
        }
    }
}

#[tokio::test]
async fn replica_run_returns_an_error_for_each_setting_that_cannot_work() {
    let env = TestEnv::start(ROUTING).await;
    const ZERO: Duration = Duration::ZERO;
    type Mutation = fn(&mut RunSettings);
    let cases: Vec<(&str, Mutation)> = vec![
        ("--block", |s| s.block = ZERO),
        ("--health-interval", |s| s.health_interval = ZERO),
        ("--recover-interval", |s| s.recover_interval = ZERO),
        ("--claim-min-idle", |s| s.claim_min_idle = ZERO),
        ("--lease-ttl", |s| s.lease_ttl = ZERO),
        ("--lease-refresh", |s| s.lease_refresh = ZERO),
        ("--scheduler-interval", |s| s.scheduler_interval = ZERO),
        ("--republish-after", |s| s.republish_after = ZERO),
        ("--dispatch-key-ttl", |s| s.dispatch_key_ttl = ZERO),
        ("--republish-after", |s| s.republish_after = s.dispatch_key_ttl),
        ("--health-interval", |s| s.health_interval = Duration::from_secs(1000 * 365 * 86_400)),
        ("--batch-size", |s| s.batch_size = 0),
        ("--max-deliveries", |s| s.max_deliveries = 0),
        ("--deadletter-maxlen", |s| s.deadletter_maxlen = 0),
        ("--health-maxlen", |s| s.health_maxlen = 0),
        ("--db-pool", |s| s.db_pool = 0),
        ("--max-payload-bytes", |s| s.limits.max_payload_bytes = 0),
        ("--max-field-bytes", |s| s.limits.max_field_bytes = 0),
        ("--max-fields", |s| s.limits.max_fields = 0),
        // More fields than Redis's Lua can pass to XADD: every trigger of such an entry would
        // be refused.
        ("--max-fields", |s| s.limits.max_fields = 4_000),
    ];
    for (flag, mutate) in cases {
        let mut settings = env.settings("settings-2");
        mutate(&mut settings);
        let token = CancellationToken::new();
        let run = tokio::time::timeout(Duration::from_secs(5), ge_orchestrator::replica::run(settings, token.clone())).await;
        token.cancel();
        match run {
            Ok(Err(e)) => assert!(format!("{e:#}").contains(flag), "the error names {flag}: {e:#}"),
            Ok(Ok(())) => panic!("{flag}: run returned Ok"),
            Err(_) => panic!("{flag}: accepted; the replica ran"),
        }
    }
}

/// Runs `ge-orchestrator run` against `env` with `vars` added for at most `secs` seconds:
/// (exit status, or None when it was still running and was stopped, and its stderr).
async fn run_for(env: &TestEnv, vars: &[(&str, &str)], secs: u64) -> (Option<std::process::ExitStatus>, String) {
    use tokio::io::AsyncReadExt;
    let mut cmd = env.run_command("settings-3", &["--http-addr", "off"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.envs(vars.iter().copied());
    let mut child = cmd.spawn().expect("start ge-orchestrator run");
    let mut stderr = child.stderr.take().expect("stderr");
    let status = match tokio::time::timeout(Duration::from_secs(secs), child.wait()).await {
        Ok(s) => Some(s.expect("wait for the replica")),
        Err(_) => {
            child.kill().await.expect("stop the replica");
            None
        }
    };
    let mut text = String::new();
    stderr.read_to_string(&mut text).await.expect("read stderr");
    (status, text)
}

/// A password in `DATABASE_URL` stays out of the log in every form sqlx takes; a form it does
/// not take (libpq's key/value conninfo) is refused at start, naming the variable, instead of
/// being logged verbatim and retried for ever.
#[tokio::test]
async fn database_passwords_stay_out_of_the_log_in_every_form() {
    let env = TestEnv::start(ROUTING).await;
    // Nothing listens on port 1: the replica retries, and logs each try (after sqlx's own
    // retries of a refused connection, 10 s).
    let urls = ["postgresql://postgres@127.0.0.1:1/db?password=S3cr3t", "postgresql://postgres:S3cr3t@127.0.0.1:1/db"];
    let vars = urls.map(|u| [("DATABASE_URL", u)]);
    let (a, b) = tokio::join!(run_for(&env, &vars[0], 14), run_for(&env, &vars[1], 14));
    for (url, (status, stderr)) in urls.into_iter().zip([a, b]) {
        assert!(status.is_none(), "{url}: it keeps trying: {stderr}");
        assert!(stderr.contains("PostgreSQL not ready"), "{url}: the retries are logged:\n{stderr}");
        assert!(!stderr.contains("S3cr3t"), "{url}: the password is in the log:\n{stderr}");
    }
    let (status, stderr) = run_for(&env, &[("DATABASE_URL", "host=127.0.0.1 port=1 user=postgres password=S3cr3t")], 10).await;
    assert!(status.is_some_and(|s| !s.success()), "a key/value conninfo is refused at start:\n{stderr}");
    assert!(stderr.contains("DATABASE_URL") && !stderr.contains("S3cr3t"), "{stderr}");
}

/// An admin token from a file or a secret often ends in a newline: it is trimmed, with a
/// warning; a token that is empty once trimmed is refused at start, naming the variable.
#[tokio::test]
async fn admin_tokens_are_trimmed_and_an_empty_one_is_refused() {
    let env = TestEnv::start(ROUTING).await;
    for var in ["GE_ADMIN_TOKEN", "GE_ADMIN_READ_TOKEN"] {
        for empty in ["", " \n"] {
            let (status, stderr) = run_for(&env, &[(var, empty)], 10).await;
            assert!(status.is_some_and(|s| !s.success()), "{var}={empty:?} accepted:\n{stderr}");
            assert!(stderr.contains(var), "the error names {var}:\n{stderr}");
        }
    }
    let (status, stderr) = run_for(&env, &[("GE_ADMIN_TOKEN", "tok-1\n")], 4).await;
    assert!(status.is_none(), "a token with a newline is taken: {stderr}");
    assert!(stderr.contains("GE_ADMIN_TOKEN") && stderr.contains("whitespace"), "a warning names it:\n{stderr}");
    assert!(!stderr.contains("tok-1"), "the warning does not show the token:\n{stderr}");
}
