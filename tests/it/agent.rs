//! The reference agent (`ge-orchestrator agent NAME -- CMD ARGS...`) as a process against a
//! real Redis: what its command sees, what it reports, and that neither a payload, an output,
//! a hung command nor a crash of the agent wedges a work package.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::{BIN, ROUTING, T, TestEnv, eventually};

/// The orchestrator's default cap on a field other than `payload` (`GE_MAX_FIELD_BYTES`).
const FIELD_CAP: usize = 64 << 10;

/// An agent process; killed when dropped.
struct Agent {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Agent {
    /// `ge-orchestrator agent NAME FLAGS -- COMMAND` with the test Redis in `REDIS_URL` and
    /// `env` added to its environment.
    fn start(env: &TestEnv, name: &str, flags: &[&str], vars: &[(&str, &str)], command: &[&str]) -> Agent {
        let log = env.dir.path().join(format!("agent-{name}-{:08x}.log", rand::random::<u32>()));
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg("agent").arg(name).args(flags).arg("--").args(command);
        cmd.env("REDIS_URL", env.redis.url()).envs(vars.iter().copied());
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).kill_on_drop(true);
        Agent { child: cmd.spawn().expect("start the agent"), log }
    }

    /// Panics with the agent's log when it has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the agent exited ({status}):\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }

    /// SIGTERM, as on a shutdown; waits for the agent to exit.
    async fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("the agent runs") as i32;
        // SAFETY: kill(2) of the agent this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(T, self.child.wait()).await.expect("the agent exits on SIGTERM").unwrap()
    }

    /// kill -9, as a crash or the OOM killer would.
    async fn crash(&mut self) {
        self.child.kill().await.expect("kill the agent");
    }
}

/// A trigger for `agent` as the orchestrator would publish it, with `extra` fields.
async fn trigger(env: &TestEnv, agent: &str, wp: &str, extra: &[(&str, &str)]) {
    let dispatch_id = format!("{wp}:1");
    let mut fields = vec![("wp_id", wp), ("agent_id", agent), ("route", "explicit"), ("attempt", "1"), ("dispatch_id", &dispatch_id)];
    fields.extend_from_slice(extra);
    env.report(&format!("triggers.{agent}"), &fields).await;
}

/// The report of `wp`'s first dispatch: (stream, fields), waiting for it while the agent runs.
async fn report_of(env: &TestEnv, agent: &mut Agent, wp: &str) -> (&'static str, HashMap<String, String>) {
    let dispatch_id = format!("{wp}:1");
    let start = Instant::now();
    loop {
        for stream in ["ge:work:completed", "ge:work:failed"] {
            if let Some(r) = env.entries(stream).await.into_iter().find(|e| e["dispatch_id"] == dispatch_id) {
                return (stream, r);
            }
        }
        agent.assert_running();
        assert!(start.elapsed() < T, "no report of {wp} after {T:?}:\n{}", std::fs::read_to_string(&agent.log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status `wp` takes once the orchestrator has applied its report, or what became of the
/// report when it was dead-lettered instead.
async fn status_after_report(env: &TestEnv, wp: &str) -> String {
    eventually(T, &format!("{wp} to leave dispatched"), || async {
        let dead = env.deadletters().await;
        if !dead.is_empty() {
            return Some(format!("dead-lettered: {dead:?}"));
        }
        env.status(wp).await.filter(|s| s != "dispatched")
    })
    .await
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Whether process `pid` still exists (a zombie waiting for its parent counts as gone).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_payload_goes_on_stdin_only_and_big_fields_stay_out_of_the_environment() {
    let env = TestEnv::start(ROUTING).await;
    // Over Linux's 128 KiB cap on one environment string, which made the command fail to start.
    let payload = "p".repeat(200 << 10);
    let big = "b".repeat(10 << 10);
    let script = r#"wc -c | tr -d ' '; echo "${GE_PAYLOAD-unset} ${GE_BIG-unset} ${GE_SMALL-unset}"; printf '%s' "$GE_FIELDS_JSON""#;
    let mut agent = Agent::start(&env, "dolly", &[], &[], &args(&sh(script)));
    trigger(&env, "dolly", "big-1", &[("payload", &payload), ("big", &big), ("small", "s")]).await;
    let (stream, report) = report_of(&env, &mut agent, "big-1").await;
    assert_eq!(stream, "ge:work:completed", "{report:?}");
    let mut lines = report["result"].lines();
    assert_eq!(lines.next(), Some("204800"), "the whole payload on stdin");
    assert_eq!(lines.next(), Some("unset unset s"), "payload and fields over the cap are not in the environment");
    let json: serde_json::Value = serde_json::from_str(lines.next().unwrap()).expect("GE_FIELDS_JSON is JSON");
    assert_eq!(json["small"], "s");
    assert_eq!(json["wp_id"], "big-1");
    assert!(json.get("payload").is_none() && json.get("big").is_none(), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_writes_before_it_reads_stdin_does_not_deadlock() {
    let env = TestEnv::start(ROUTING).await;
    // Both more than a pipe holds (64 KiB): an agent that writes all of stdin before reading
    // stdout waits on the command, which waits on the agent.
    let payload = "p".repeat(100 << 10);
    let script = "yes | head -c 1000000; wc -c >&2";
    let mut agent = Agent::start(&env, "dolly", &[], &[], &args(&sh(script)));
    trigger(&env, "dolly", "chatty-1", &[("payload", &payload)]).await;
    let (stream, report) = report_of(&env, &mut agent, "chatty-1").await;
    assert_eq!(stream, "ge:work:completed", "{report:?}");
    let result = &report["result"];
    assert!(result.len() <= FIELD_CAP, "result of {} bytes", result.len());
    assert!(result.starts_with("y\ny\n") && result.ends_with("y\ny"), "the beginning and the end are kept");
    assert!(result.contains("bytes cut ...]"), "the cut is marked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_failure_report_fits_the_orchestrator_and_the_work_package_retries() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("agent-r1");
    // 200 KB of stderr: the agent used to send 64 KiB of it plus a prefix, over the
    // orchestrator's field cap, so the report was dead-lettered and the work package stayed
    // dispatched for ever.
    let script = "yes e | head -c 200000 >&2; echo last words >&2; exit 3";
    let mut agent = Agent::start(&env, "dolly", &[], &[], &args(&sh(script)));
    env.submit(&[("wp_id", "loud-1"), ("agent_id", "dolly")]).await;
    let (stream, report) = report_of(&env, &mut agent, "loud-1").await;
    assert_eq!(stream, "ge:work:failed");
    let error = &report["error"];
    assert!(error.len() <= FIELD_CAP, "error of {} bytes", error.len());
    assert!(error.starts_with("exit status: 3: e\ne\n"), "{}", &error[..40]);
    assert!(error.ends_with("e\nlast words") && error.contains("bytes cut ...]"));
    assert_eq!(report["retryable"], "true");
    assert_eq!(status_after_report(&env, "loud-1").await, "retry_wait");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_report_bytes_cuts_on_character_boundaries() {
    let env = TestEnv::start(ROUTING).await;
    // Two-byte characters: a cut at an odd byte would split one.
    let script = "i=0; while [ $i -lt 3000 ]; do printf 'é'; i=$((i+1)); done";
    let mut agent = Agent::start(&env, "dolly", &["--max-report-bytes", "1001"], &[], &args(&sh(script)));
    trigger(&env, "dolly", "utf8-1", &[]).await;
    let (_, report) = report_of(&env, &mut agent, "utf8-1").await;
    let result = &report["result"];
    assert!(result.len() <= 1001 && result.len() > 900, "{} bytes", result.len());
    assert!(result.starts_with("éé") && result.ends_with("éé") && !result.contains('\u{FFFD}'), "{result}");
    assert!(result.contains("bytes cut ...]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_in_the_output_are_replaced_so_postgresql_can_store_the_result() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("agent-r2");
    let mut agent = Agent::start(&env, "dolly", &[], &[], &["printf", r"a\000b"]);
    env.submit(&[("wp_id", "nul-1"), ("agent_id", "dolly")]).await;
    let (_, report) = report_of(&env, &mut agent, "nul-1").await;
    assert_eq!(report["result"], "a\u{FFFD}b");
    assert_eq!(status_after_report(&env, "nul-1").await, "completed");
    let stored: Option<String> =
        sqlx::query_scalar("SELECT result FROM work_packages WHERE wp_id = 'nul-1'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(stored.as_deref(), Some("a\u{FFFD}b"));
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_outlives_its_timeout_is_killed_with_its_children() {
    let env = TestEnv::start(ROUTING).await;
    let pidfile = env.dir.path().join("child.pid");
    let script = format!("sleep 300 & echo $! > {}; wait", path(&pidfile));
    let mut agent = Agent::start(&env, "dolly", &["--timeout", "1s"], &[], &args(&sh(&script)));
    let started = Instant::now();
    trigger(&env, "dolly", "slow-1", &[]).await;
    let (stream, report) = report_of(&env, &mut agent, "slow-1").await;
    assert!(started.elapsed() < Duration::from_secs(30), "reported after {:?}", started.elapsed());
    assert_eq!(stream, "ge:work:failed");
    assert!(report["error"].contains("timed out after 1s"), "{}", report["error"]);
    assert_eq!(report["retryable"], "true");
    let pid = pid_in(&pidfile).await;
    eventually(T, "the command's child to be killed too", || async { (!alive(pid)).then_some(()) }).await;
}

/// The pid a command wrote to `file`, once it has.
async fn pid_in(file: &Path) -> i32 {
    eventually(T, "the command to write its pid", || async { std::fs::read_to_string(file).ok()?.trim().parse().ok() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_kills_its_command_and_leaves_the_trigger_pending() {
    let env = TestEnv::start(ROUTING).await;
    let pidfile = env.dir.path().join("child.pid");
    let script = format!("sleep 300 & echo $! > {}; wait", path(&pidfile));
    let mut agent = Agent::start(&env, "dolly", &[], &[], &args(&sh(&script)));
    trigger(&env, "dolly", "stop-1", &[]).await;
    let pid = pid_in(&pidfile).await;
    assert!(agent.stop().await.success());
    eventually(T, "the command's child to be killed", || async { (!alive(pid)).then_some(()) }).await;
    for stream in ["ge:work:completed", "ge:work:failed"] {
        assert!(env.entries(stream).await.is_empty(), "nothing is reported for a run cut short");
    }
    let mut con = env.con.clone();
    let pending = ge_orchestrator::engine::streams::pending_summary(&mut con, "triggers.dolly", "agent-dolly").await.unwrap();
    assert_eq!(pending.count, 1, "the trigger waits for the next start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_runs_the_trigger_it_had_taken_when_it_crashed() {
    let env = TestEnv::start(ROUTING).await;
    let (flag, pidfile) = (env.dir.path().join("started"), env.dir.path().join("sleep.pid"));
    // The first run hangs (and the agent is killed during it); the run after the restart ends.
    let script = format!(
        "if [ -e {f} ]; then echo second run; else touch {f}; echo $$ > {p}; exec sleep 300; fi",
        f = path(&flag),
        p = path(&pidfile)
    );
    let mut first = Agent::start(&env, "dolly", &[], &[], &args(&sh(&script)));
    trigger(&env, "dolly", "crash-1", &[]).await;
    let pid = pid_in(&pidfile).await;
    first.crash().await;
    // SAFETY: kill(2) of the orphaned command this test started through the agent.
    unsafe { libc::kill(pid, libc::SIGKILL) };

    let mut second = Agent::start(&env, "dolly", &[], &[], &args(&sh(&script)));
    let (stream, report) = report_of(&env, &mut second, "crash-1").await;
    assert_eq!((stream, report["result"].as_str()), ("ge:work:completed", "second run"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_left_by_a_gone_consumer_are_claimed_and_none_runs_twice() {
    let env = TestEnv::start(ROUTING).await;
    let mut con = env.con.clone();
    ge_orchestrator::engine::streams::ensure_group(&mut con, "triggers.dolly", "agent-dolly").await.unwrap();
    trigger(&env, "dolly", "orphan-1", &[]).await;
    // Taken by a consumer under a random name, as earlier agents used, that never comes back.
    let taken = ge_orchestrator::engine::streams::read_group(&mut con, "triggers.dolly", "agent-dolly", "dolly-5ca1ab1e", 10, None, ">")
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);

    // Two instances; each run lasts longer than --claim-idle, which must not make the other
    // instance take it.
    let runs = env.dir.path().join("runs");
    let script = format!("echo $GE_WP_ID >> {}; sleep 3; echo ok", path(&runs));
    let flags = |c: &'static str| ["--consumer", c, "--claim-idle", "1s"];
    let mut one = Agent::start(&env, "dolly", &flags("one"), &[], &args(&sh(&script)));
    let mut two = Agent::start(&env, "dolly", &flags("two"), &[], &args(&sh(&script)));
    for wp in ["fresh-1", "fresh-2"] {
        trigger(&env, "dolly", wp, &[]).await;
    }
    for wp in ["orphan-1", "fresh-1", "fresh-2"] {
        let (stream, _) = report_of(&env, &mut one, wp).await;
        assert_eq!(stream, "ge:work:completed");
    }
    two.assert_running();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ran: Vec<String> = std::fs::read_to_string(&runs).unwrap().lines().map(str::to_string).collect();
    ran.sort();
    assert_eq!(ran, ["fresh-1", "fresh-2", "orphan-1"], "each trigger runs once");
    assert_eq!(env.entries("ge:work:completed").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_gets_no_secrets_unless_asked() {
    let env = TestEnv::start(ROUTING).await;
    let secrets = [
        ("DATABASE_URL", "postgres://u:dbpass@db/x"),
        ("GE_ADMIN_TOKEN", "admintoken"),
        ("GE_ADMIN_READ_TOKEN", "readtoken"),
        ("GE_REDIS_CA_CERT", "/etc/ca.pem"),
    ];
    let mut plain = Agent::start(&env, "dolly", &[], &secrets, &["env"]);
    let mut asked = Agent::start(&env, "ada", &["--pass-env", "DATABASE_URL", "--pass-env", "REDIS_URL"], &secrets, &["env"]);
    trigger(&env, "dolly", "env-1", &[]).await;
    trigger(&env, "ada", "env-2", &[]).await;
    let (_, report) = report_of(&env, &mut plain, "env-1").await;
    let seen = &report["result"];
    assert!(seen.contains("GE_WP_ID=env-1"), "{seen}");
    for name in ["REDIS_URL", "DATABASE_URL", "GE_ADMIN_TOKEN", "GE_ADMIN_READ_TOKEN", "GE_REDIS_CA_CERT"] {
        assert!(!seen.lines().any(|l| l.starts_with(&format!("{name}="))), "{name} reached the command:\n{seen}");
    }
    let (_, report) = report_of(&env, &mut asked, "env-2").await;
    let seen = &report["result"];
    assert!(seen.contains("DATABASE_URL=postgres://u:dbpass@db/x") && seen.contains(&format!("REDIS_URL={}", env.redis.url())), "{seen}");
    assert!(!seen.contains("GE_ADMIN_TOKEN="), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_flow_while_the_command_runs_and_stop_when_it_ends() {
    let env = TestEnv::start(ROUTING).await;
    let mut agent = Agent::start(&env, "dolly", &["--heartbeat-interval", "200ms"], &[], &["sleep", "2"]);
    trigger(&env, "dolly", "beat-1", &[]).await;
    let beats = eventually(T, "heartbeats", || async { Some(env.entries("ge:work:heartbeat").await).filter(|b| b.len() >= 2) }).await;
    assert!(env.entries("ge:work:completed").await.is_empty(), "the heartbeats came while the command ran");
    for b in &beats {
        assert_eq!((b["wp_id"].as_str(), b["dispatch_id"].as_str(), b["agent_id"].as_str()), ("beat-1", "beat-1:1", "dolly"));
    }
    report_of(&env, &mut agent, "beat-1").await;
    let after = env.entries("ge:work:heartbeat").await.len();
    assert!(after >= 4, "{after} heartbeats in 2 s at 200 ms");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.entries("ge:work:heartbeat").await.len(), after, "no heartbeat once the command has ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_gets_the_trigger_s_trace_context_as_traceparent() {
    let env = TestEnv::start(ROUTING).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut agent = Agent::start(&env, "dolly", &[], &[], &args(&sh("echo \"$TRACEPARENT|$TRACESTATE\"")));
    trigger(&env, "dolly", "tp-1", &[("traceparent", tp), ("tracestate", "congo=t61rcWkgMzE")]).await;
    let (_, report) = report_of(&env, &mut agent, "tp-1").await;
    assert_eq!(report["result"], format!("{tp}|congo=t61rcWkgMzE"));
}

/// A trigger delivered again with a dispatch_id the agent has run (a Redis failover can lose
/// the first entry after the agent read it, and the orchestrator publishes it again) does not
/// run the command again: its report is sent again, the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_delivered_twice_runs_once_and_is_reported_again() {
    let env = TestEnv::start(ROUTING).await;
    let runs = env.dir.path().join("runs");
    let script = format!("echo run >> {}; echo done", path(&runs));
    let mut agent = Agent::start(&env, "dolly", &[], &[], &args(&sh(&script)));
    trigger(&env, "dolly", "again-1", &[]).await;
    let (stream, first) = report_of(&env, &mut agent, "again-1").await;
    assert_eq!(stream, "ge:work:completed");
    trigger(&env, "dolly", "again-1", &[]).await;
    let reports = eventually(T, "the second report", || async {
        let r: Vec<HashMap<String, String>> =
            env.entries("ge:work:completed").await.into_iter().filter(|e| e["dispatch_id"] == "again-1:1").collect();
        (r.len() == 2).then_some(r)
    })
    .await;
    assert_eq!(reports[1]["result"], first["result"], "the same report");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n", "the command ran once");
    agent.assert_running();
}
