//! The test harness: real Redis and PostgreSQL started on free ports, replicas run in-process
//! (or as processes where a test kills them), and small helpers to talk to the streams.
//! Shared by the functional tests (`tests/it`) and the browser test (`tests/browser.rs`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ge_orchestrator::engine::settings::RunSettings;
use ge_orchestrator::tools::localstack::{LocalPostgres, LocalRedis, PostgresOptions, RedisOptions};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that takes well under a second when all is well. It is
/// generous because tests run side by side on few cores: running out of it is a failure, never
/// a measurement.
pub const T: Duration = Duration::from_secs(60);

/// The ge-orchestrator binary, for tests that run it as a process.
pub const BIN: &str = env!("CARGO_BIN_EXE_ge-orchestrator");

/// One PostgreSQL server per test binary; each test gets its own database in it.
static POSTGRES: OnceCell<LocalPostgres> = OnceCell::const_new();

pub const ROUTING: &str = r#"version: 1
agents:
  dolly:  { roles: [coordinator] }
  ada:    { roles: [developer], max_in_flight: 4 }
  turing: { roles: [developer, reviewer] }
  hopper: { roles: [ops], enabled: false }
work_types:
  implement: developer
  code_review: reviewer
  deploy: ops
triggers:
  - { pattern: "github.pull_request.*", role: reviewer }
  - { pattern: "alert.*", agent: hopper }
default_agent: dolly
retry: { max_attempts: 3, backoff: { initial: 10s, factor: 2, max: 10m } }
"#;

pub struct TestEnv {
    pub redis: LocalRedis,
    /// Set when this test has a PostgreSQL of its own (to kill or restart it).
    pub own_postgres: Option<LocalPostgres>,
    pub database_url: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub pool: PgPool,
    pub con: ConnectionManager,
}

impl TestEnv {
    /// A fresh Redis, a fresh database and a routing file with `routing` in it.
    pub async fn start(routing: &str) -> TestEnv {
        let pg = POSTGRES.get_or_init(|| async { LocalPostgres::start(PostgresOptions::default()).await.expect("start postgres") }).await;
        let name = format!("t_{:016x}", rand::random::<u64>());
        let database_url = pg.create_database(&name).await.expect("create database");
        Self::with(routing, database_url, None, RedisOptions::default()).await
    }

    /// Like `start`, with a PostgreSQL of its own and a Redis that persists (AOF, fsync
    /// always), so the test may kill and restart both.
    pub async fn start_isolated(routing: &str) -> TestEnv {
        let pg = LocalPostgres::start(PostgresOptions::default()).await.expect("start postgres");
        let database_url = pg.create_database("orchestrator").await.expect("create database");
        Self::with(routing, database_url, Some(pg), RedisOptions { persistent: true, ..Default::default() }).await
    }

    async fn with(routing: &str, database_url: String, own_postgres: Option<LocalPostgres>, redis: RedisOptions) -> TestEnv {
        let redis = LocalRedis::start(redis).await.expect("start redis");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("routing.yaml");
        std::fs::write(&config, routing).expect("write routing");
        let pool = ge_orchestrator::engine::store::connect(&database_url, 4).await.expect("connect to the test database");
        let client = redis::Client::open(redis.url()).expect("redis url");
        let con = ge_orchestrator::engine::streams::manager(&client).await.expect("connect to redis");
        TestEnv { redis, own_postgres, database_url, dir, config, pool, con }
    }

    /// Settings with short intervals, so tests run in seconds.
    pub fn settings(&self, consumer: &str) -> RunSettings {
        let mut s = RunSettings::new(self.redis.url(), self.database_url.clone(), self.config.clone());
        s.consumer = Some(consumer.to_string());
        s.block = Duration::from_millis(200);
        s.scheduler_interval = Duration::from_millis(100);
        s.health_interval = Duration::from_secs(1);
        s.db_pool = 4;
        s
    }

    /// `ge-orchestrator run --consumer CONSUMER ARGS...` against this Redis, database and
    /// routing file, killed when dropped.
    pub fn run_command(&self, consumer: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(["run", "--consumer", consumer])
            .args(args)
            .env("REDIS_URL", self.redis.url())
            .env("DATABASE_URL", &self.database_url)
            .env("GE_ROUTING_CONFIG", &self.config)
            .kill_on_drop(true);
        cmd
    }

    /// A replica process serving HTTP on a free port, with `vars` in its environment and its
    /// log in `log` (when given), once it is ready.
    pub async fn serve_process(
        &self,
        consumer: &str,
        vars: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> (tokio::process::Child, u16) {
        let port = free_port();
        let mut cmd = self.run_command(consumer, &["--block", "200ms", "--http-addr", &format!("127.0.0.1:{port}")]);
        cmd.stdout(std::process::Stdio::null()).stderr(match log {
            Some(path) => std::process::Stdio::from(std::fs::File::create(path).expect("create the log")),
            None => std::process::Stdio::null(),
        });
        cmd.envs(vars.iter().copied());
        let child = cmd.spawn().expect("start the replica");
        wait_ready(port).await;
        (child, port)
    }

    pub fn replica(&self, consumer: &str) -> Replica {
        Replica::spawn(self.settings(consumer))
    }

    pub fn write_routing(&self, routing: &str) {
        std::fs::write(&self.config, routing).expect("write routing");
    }

    pub async fn submit(&self, fields: &[(&str, &str)]) -> String {
        self.report("ge:work:incoming", fields).await
    }

    /// XADD, retried as a producer would across a Redis restart.
    pub async fn report(&self, stream: &str, fields: &[(&str, &str)]) -> String {
        let mut con = self.con.clone();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        let mut tries = 0;
        loop {
            match cmd.query_async(&mut con).await {
                Ok(id) => return id,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("xadd {stream}: {e}"),
            }
        }
    }

    /// Completes the dispatch described by a trigger entry.
    pub async fn complete(&self, trigger: &HashMap<String, String>) {
        self.report("ge:work:completed", &[("wp_id", &trigger["wp_id"]), ("dispatch_id", &trigger["dispatch_id"])]).await;
    }

    pub async fn fail(&self, trigger: &HashMap<String, String>, retryable: bool) {
        let r = if retryable { "true" } else { "false" };
        self.report(
            "ge:work:failed",
            &[("wp_id", &trigger["wp_id"]), ("dispatch_id", &trigger["dispatch_id"]), ("error", "boom"), ("retryable", r)],
        )
        .await;
    }

    /// Every entry of a stream, as text maps, oldest first.
    pub async fn entries(&self, stream: &str) -> Vec<HashMap<String, String>> {
        let mut con = self.con.clone();
        let v: redis::Value = redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query_async(&mut con).await.expect("xrange");
        ge_orchestrator::engine::streams::parse_entries(&v)
            .into_iter()
            .map(|e| {
                let mut m: HashMap<String, String> = e
                    .fields
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
                    .collect();
                m.insert("_id".into(), e.id);
                m
            })
            .collect()
    }

    pub async fn triggers(&self, agent: &str) -> Vec<HashMap<String, String>> {
        self.entries(&format!("triggers.{agent}")).await
    }

    /// All triggers of every agent of the test routing file.
    pub async fn all_triggers(&self) -> Vec<HashMap<String, String>> {
        let mut all = Vec::new();
        for a in ["dolly", "ada", "turing", "hopper"] {
            all.extend(self.triggers(a).await);
        }
        all
    }

    pub async fn deadletters(&self) -> Vec<HashMap<String, String>> {
        self.entries("ge:work:deadletter").await
    }

    pub async fn status(&self, wp_id: &str) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM work_packages WHERE wp_id = $1")
            .bind(wp_id)
            .fetch_optional(&self.pool)
            .await
            .expect("query status")
    }

    /// The trigger-kept in-flight counters (migration 0003) against a count of the rows.
    pub async fn assert_in_flight_consistent(&self) {
        let kept: Vec<(String, i32)> =
            sqlx::query_as("SELECT agent_id, sum(n)::int4 FROM agent_in_flight GROUP BY agent_id HAVING sum(n) <> 0 ORDER BY agent_id")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let counted: Vec<(String, i32)> = sqlx::query_as(
            "SELECT agent_id, count(*)::int4 FROM work_packages WHERE status = 'dispatched' GROUP BY agent_id ORDER BY agent_id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert_eq!(kept, counted, "agent_in_flight drifted from the work packages");
    }

    /// Pending entries of the orchestrator group over the three input streams; `u64::MAX`
    /// while the group does not exist yet.
    pub async fn pending(&self) -> u64 {
        let mut con = self.con.clone();
        let mut n = 0;
        for s in ["ge:work:incoming", "ge:work:completed", "ge:work:failed"] {
            match ge_orchestrator::engine::streams::pending_summary(&mut con, s, "orchestrator-group").await {
                Ok(summary) => n += summary.count,
                Err(e) if ge_orchestrator::engine::streams::is_nogroup(&e) => return u64::MAX,
                Err(e) => panic!("xpending: {e}"),
            }
        }
        n
    }
}

/// Polls `check` until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica running in this process.
pub struct Replica {
    pub token: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    pub fn spawn(settings: RunSettings) -> Replica {
        let token = CancellationToken::new();
        let handle = tokio::spawn(ge_orchestrator::replica::run(settings, token.clone()));
        Replica { token, handle }
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(self) {
        self.token.cancel();
        self.handle.await.expect("replica task").expect("replica run");
    }
}

/// A plain HTTP GET on 127.0.0.1: (status code, body). None when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf)).await.ok()?.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Some((code, body))
}

/// `ge-orchestrator dev --exit-when-done` from the repository (for `examples/plan.yaml`), with
/// reference agents running `agent_command` and the processes' logs in `logs`.
pub fn dev_command(logs: &std::path::Path, agent_command: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["dev", "--exit-when-done", "--agent-command", agent_command])
        .arg("--log-dir")
        .arg(logs);
    cmd
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A plain HTTP request on 127.0.0.1 with an optional bearer token and JSON body: (status
/// code, body parsed as JSON, or Null).
pub async fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the replica's HTTP port");
    let body = body.unwrap_or("");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf)).await.expect("response in time").expect("read response");
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let text = buf.split("\r\n\r\n").nth(1).unwrap_or_default();
    (code, serde_json::from_str(text).unwrap_or(serde_json::Value::Null))
}

/// Settings of a replica that serves HTTP on a free port, with `token` as its admin token.
pub fn http_settings(env: &TestEnv, consumer: &str, token: Option<&str>) -> (RunSettings, u16) {
    let port = free_port();
    let mut s = env.settings(consumer);
    s.http_addr = format!("127.0.0.1:{port}");
    s.admin_token = token.map(str::to_string);
    (s, port)
}

/// Waits until the replica at `port` answers /readyz with 200.
pub async fn wait_ready(port: u16) {
    eventually(Duration::from_secs(30), "the replica to be ready", || async {
        http_get(port, "/readyz").await.filter(|(c, _)| *c == 200).map(|_| ())
    })
    .await
}
