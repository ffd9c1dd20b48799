//! TLS to Redis (`rediss://`) and PostgreSQL, Redis AUTH, and passwords kept out of logs,
//! health entries and error messages.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ge_orchestrator::tools::localstack::{LocalPostgres, LocalRedis, PostgresOptions, RedisOptions, TlsFiles};

use crate::harness::{BIN, ROUTING, T, eventually};

const REDIS_PW: &str = "redis-S3cret-pw";
const PG_PW: &str = "pg-S3cret-pw";

/// A CA and a server certificate for 127.0.0.1 and localhost, made with openssl.
fn certificates(dir: &Path) -> TlsFiles {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ge-test-ca"]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    TlsFiles { cert: dir.join("server.pem"), key: dir.join("server.key"), ca: dir.join("ca.pem") }
}

#[tokio::test]
async fn tls_and_auth_work_and_no_password_leaks() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let tls = certificates(dir.path());
    let mut redis =
        LocalRedis::start(RedisOptions { password: Some(REDIS_PW.into()), tls: Some(tls.clone()), persistent: true }).await.unwrap();
    let pg = LocalPostgres::start(PostgresOptions { tls: Some(tls.clone()), ..Default::default() }).await.unwrap();
    pg.create_database("secure").await.unwrap();
    let ca = tls.ca.to_string_lossy().to_string();
    let database_url = format!("postgres://postgres:{PG_PW}@127.0.0.1:{}/secure?sslmode=verify-full&sslrootcert={ca}", pg.port());
    assert!(redis.url().starts_with("rediss://"));
    let config = dir.path().join("routing.yaml");
    std::fs::write(&config, ROUTING).unwrap();

    let log = dir.path().join("replica.log");
    let mut replica = Command::new(BIN)
        .args(["run", "--consumer", "secure-1", "--block", "200ms", "--health-interval", "300ms", "--http-addr", "off"])
        .env("REDIS_URL", redis.url())
        .env("GE_REDIS_CA_CERT", &ca)
        .env("DATABASE_URL", &database_url)
        .env("GE_ROUTING_CONFIG", &config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    // The test talks TLS with the same CA. The replica and the CLI read it from
    // GE_REDIS_CA_CERT; the test passes it to the client directly, since setting a variable
    // in the environment of a process running other tests side by side is a data race.
    let root_cert = Some(std::fs::read(&tls.ca).unwrap());
    let client = redis::Client::build_with_tls(redis.url(), redis::TlsCertificates { client_tls: None, root_cert }).unwrap();
    let mut con = ge_orchestrator::engine::streams::manager(&client).await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg("ge:work:incoming")
        .arg("*")
        .arg("wp_id")
        .arg("s1")
        .arg("agent_id")
        .arg("dolly")
        .query_async(&mut con)
        .await
        .unwrap();
    eventually(T, "dispatched over TLS", || {
        let mut con = con.clone();
        async move {
            let n: u64 = redis::cmd("XLEN").arg("triggers.dolly").query_async(&mut con).await.ok()?;
            (n == 1).then_some(())
        }
    })
    .await;

    // PostgreSQL connections of the replica are encrypted.
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = 'secure' AND s.ssl AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(encrypted >= 1, "the replica's connections use TLS");

    // An outage makes the replica log connection errors; none may carry a password.
    redis.kill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.restart().await.unwrap();
    let mut con = ge_orchestrator::engine::streams::manager(&client).await.unwrap();
    eventually(T, "health entries", || {
        let mut con = con.clone();
        async move {
            let n: u64 = redis::cmd("XLEN").arg("system.health").query_async(&mut con).await.ok()?;
            (n >= 2).then_some(())
        }
    })
    .await;
    unsafe { libc::kill(replica.id() as i32, libc::SIGTERM) };
    assert!(replica.wait().unwrap().success());
    let health: redis::Value = redis::cmd("XRANGE").arg("system.health").arg("-").arg("+").query_async(&mut con).await.unwrap();
    let health = format!("{health:?}");
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("secure-1"), "the log was captured");
    for secret in [REDIS_PW, PG_PW] {
        assert!(!logs.contains(secret), "a password in the logs:\n{logs}");
        assert!(!health.contains(secret), "a password in a health entry");
    }

    // Wrong credentials: a clear error, without the password.
    let out = Command::new(BIN)
        .args(["submit", "examples/plan.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("REDIS_URL", format!("rediss://:wrong-{REDIS_PW}@127.0.0.1:{}", redis.port()))
        .env("GE_REDIS_CA_CERT", &ca)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains(REDIS_PW), "{err}");
    assert!(err.contains("***") || err.to_lowercase().contains("auth") || err.contains("WRONGPASS"), "says what is wrong: {err}");
}
