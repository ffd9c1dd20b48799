//! The HTTP port holds nobody's connection forever: a client has `GE_HTTP_HEADER_TIMEOUT` to
//! send a request's headers (and an idle connection stays no longer), a response the client
//! does not read is abandoned after `GE_HTTP_REQUEST_TIMEOUT`, and at most
//! `GE_HTTP_MAX_CONNECTIONS` connections are served at once. The replica runs as a process
//! here: these are settings of the binary.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{ROUTING, T, TestEnv, eventually, http_get};

async fn replica(env: &TestEnv, vars: &[(&str, &str)]) -> (tokio::process::Child, u16) {
    env.serve_process("http-1", vars, None).await
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.expect("connect")
}

/// Reads until the server closes; Err when it did not within `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut buf)).await {
        Ok(_) => Ok(buf),
        Err(_) => Err(format!("still open after {within:?}, {} bytes read", buf.len())),
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_disconnected() {
    let env = TestEnv::start(ROUTING).await;
    let (_replica, port) = replica(&env, &[("GE_HTTP_HEADER_TIMEOUT", "1s")]).await;
    let mut half = connect(port).await;
    half.write_all(b"GET /api/overview HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
    let mut silent = connect(port).await;
    let start = Instant::now();
    for s in [&mut half, &mut silent] {
        let got = read_until_closed(s, Duration::from_secs(10)).await.unwrap();
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "{got:?}");
    }
    assert!(start.elapsed() < Duration::from_secs(5), "closed after {:?}", start.elapsed());
    // An idle keep-alive connection is closed too; a fresh request is served.
    let mut idle = connect(port).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut idle, Duration::from_secs(10)).await.unwrap();
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{got:?}");
}

#[tokio::test]
async fn connections_beyond_the_cap_are_not_served() {
    let env = TestEnv::start(ROUTING).await;
    let (_replica, port) = replica(&env, &[("GE_HTTP_MAX_CONNECTIONS", "2"), ("GE_HTTP_HEADER_TIMEOUT", "60s")]).await;
    // wait_ready's connections are closed; give the server a moment to see it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = connect(port).await;
    let _second = connect(port).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = connect(port).await;
    let _ = third.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await;
    let got = read_until_closed(&mut third, Duration::from_secs(10)).await.unwrap_or_else(|e| panic!("the third connection: {e}"));
    let text = String::from_utf8_lossy(&got);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 503"), "the third connection was served: {text}");
    // One leaves; the next is served.
    drop(first);
    eventually(T, "a connection served again", || async { http_get(port, "/healthz").await.filter(|(c, _)| *c == 200) }).await;
}

#[tokio::test]
async fn a_response_the_client_does_not_read_is_abandoned() {
    let env = TestEnv::start(ROUTING).await;
    let (_replica, port) = replica(&env, &[("GE_HTTP_REQUEST_TIMEOUT", "1s")]).await;
    // About 16 MB of dead letters: more than the sockets' buffers hold.
    let value = "v".repeat(4000);
    let mut con = env.con.clone();
    let mut pipe = redis::pipe();
    for i in 0..500 {
        let cmd = pipe.cmd("XADD").arg("ge:work:incoming").arg("*").arg("wp_id").arg(format!("big-{i}")).arg("agent_id").arg("ghost");
        for f in 0..8 {
            cmd.arg(format!("f{f}")).arg(&value);
        }
        cmd.ignore();
    }
    let () = pipe.query_async(&mut con).await.unwrap();
    eventually(T, "500 dead letters", || async {
        let n: u64 = redis::cmd("XLEN").arg("ge:work:deadletter").query_async(&mut env.con.clone()).await.unwrap();
        (n == 500).then_some(())
    })
    .await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    s.write_all(b"GET /api/deadletters?limit=500 HTTP/1.0\r\n\r\n").await.unwrap();
    // The client reads nothing for a while, then everything it can.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got)).await.expect("the server ended the connection");
    let head = String::from_utf8_lossy(&got[..got.len().min(4096)]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(usize::MAX);
    let body = got.len() - head.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0);
    assert!(read.is_err() || body < length, "the whole response ({body} of {length} bytes) was kept for a client that did not read");
}
