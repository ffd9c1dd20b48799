//! (v1.6) Live progress: heartbeats that carry it, kept per running dispatch and bounded in
//! size and rate; shown by the API, `status` and the live stream; forwarded by the reference
//! agent from the file its command writes.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{BIN, ROUTING, Replica, T, TestEnv, eventually, http, http_settings, wait_ready};

const HEARTBEATS: &str = "ge:work:heartbeat";

async fn progress_of(env: &TestEnv, wp: &str) -> Option<(Option<String>, Option<f32>, f64)> {
    sqlx::query_as("SELECT text, fraction, extract(epoch FROM at)::float8 FROM work_package_progress WHERE wp_id = $1")
        .bind(wp)
        .fetch_optional(&env.pool)
        .await
        .unwrap()
}

/// Waits until the group has read and acknowledged the heartbeat entry `id` and all before it.
async fn acknowledged(env: &TestEnv, id: &str) {
    let parse = |s: &str| ge_orchestrator_id(s);
    eventually(T, "the heartbeats acknowledged", || async {
        let mut con = env.con.clone();
        let reply: redis::streams::StreamInfoGroupsReply = redis::AsyncCommands::xinfo_groups(&mut con, HEARTBEATS).await.ok()?;
        let g = reply.groups.into_iter().find(|g| g.name == "orchestrator-group")?;
        (g.pending == 0 && parse(&g.last_delivered_id) >= parse(id)).then_some(())
    })
    .await;
}

fn ge_orchestrator_id(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reaches_the_api_status_and_the_live_stream_bounded() {
    let env = TestEnv::start(ROUTING).await;
    let (settings, port) = http_settings(&env, "r1", None);
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    env.submit(&[("wp_id", "job"), ("agent_id", "dolly")]).await;
    let t = eventually(T, "the trigger", || async { env.triggers("dolly").await.into_iter().next() }).await;
    let (wp, d) = (t["wp_id"].as_str(), t["dispatch_id"].as_str());

    // The live stream, opened before the progress is reported.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /api/progress/stream HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n").await.unwrap();

    let long = "é".repeat(500);
    env.report(HEARTBEATS, &[("wp_id", wp), ("dispatch_id", d), ("progress", &long), ("progress_fraction", "0.25")]).await;
    let (text, fraction, _) = eventually(T, "progress stored", || async { progress_of(&env, wp).await }).await;
    assert!(text.as_ref().unwrap().len() <= 200, "cut to 200 bytes: {}", text.unwrap().len());
    assert_eq!(fraction, Some(0.25));

    // The rate bound: a second report less than a second after the first is not written.
    let id = env.report(HEARTBEATS, &[("wp_id", wp), ("dispatch_id", d), ("progress", "step 2"), ("progress_fraction", "0.5")]).await;
    acknowledged(&env, &id).await;
    let (text, _, at) = progress_of(&env, wp).await.unwrap();
    let now: f64 = sqlx::query_scalar("SELECT extract(epoch FROM now())::float8").fetch_one(&env.pool).await.unwrap();
    if now - at < 1.0 {
        assert_ne!(text.as_deref(), Some("step 2"), "written twice within a second");
    }
    // A second later it is.
    eventually(T, "the next report written", || async {
        env.report(HEARTBEATS, &[("wp_id", wp), ("dispatch_id", d), ("progress", "step 3"), ("progress_fraction", "0.75")]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        progress_of(&env, wp).await.filter(|p| p.0.as_deref() == Some("step 3"))
    })
    .await;
    // Progress for another dispatch (an older attempt) or a bad fraction changes nothing.
    let id = env.report(HEARTBEATS, &[("wp_id", wp), ("dispatch_id", "job:0"), ("progress", "stale")]).await;
    acknowledged(&env, &id).await;
    assert_eq!(progress_of(&env, wp).await.unwrap().0.as_deref(), Some("step 3"));

    // The API and status show it.
    let (_, view) = http(port, "GET", "/api/work-packages/job", None, None).await;
    assert_eq!(view["progress"]["text"], "step 3", "{view}");
    assert_eq!(view["progress"]["fraction"], 0.75, "{view}");
    assert!(view["why"].as_str().unwrap().contains("progress 75%: step 3"), "{view}");
    let out = Command::new(BIN).args(["status", "job"]).env("DATABASE_URL", &env.database_url).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("progress 75%: step 3"), "{}", String::from_utf8_lossy(&out.stdout));

    // The stream sent it as server-sent events.
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("step 3") {
        let n = tokio::time::timeout(T, stream.read(&mut buf)).await.expect("the stream sends").unwrap();
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("text/event-stream"), "{seen}");
    assert!(seen.contains("event: progress"), "{seen}");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::start(ROUTING).await;
    let (settings, port) = http_settings(&env, "r1", None);
    let replica = Replica::spawn(settings);
    wait_ready(port).await;
    let mut open = Vec::new();
    let mut codes = Vec::new();
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET /api/progress/stream HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(T, s.read_exact(&mut head)).await.expect("an answer").unwrap();
        codes.push(String::from_utf8_lossy(&head[9..12]).into_owned());
        open.push(s);
    }
    assert!(codes[..32].iter().all(|c| c == "200"), "{codes:?}");
    assert!(codes[32..].iter().all(|c| c == "503"), "at most 32 at once: {codes:?}");
    drop(open);
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_agent_forwards_what_its_command_writes_to_the_progress_file() {
    let env = TestEnv::start(ROUTING).await;
    let replica = env.replica("r1");
    let log = env.dir.path().join("agent.log");
    let mut agent = tokio::process::Command::new(BIN)
        .args(["agent", "dolly", "--heartbeat-interval", "off", "--", "sh", "-c"])
        .arg("echo 'starting' > \"$GE_PROGRESS_FILE\"; sleep 1; echo '40% compiling' >> \"$GE_PROGRESS_FILE\"; sleep 30")
        .env("REDIS_URL", env.redis.url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    env.submit(&[("wp_id", "build"), ("agent_id", "dolly")]).await;
    let (text, fraction, _) = eventually(T, "the command's progress", || async {
        progress_of(&env, "build").await.filter(|p| p.0.as_deref() == Some("compiling"))
    })
    .await;
    assert_eq!(text.as_deref(), Some("compiling"));
    assert_eq!(fraction, Some(0.4));
    agent.kill().await.unwrap();
    replica.stop().await;
}
