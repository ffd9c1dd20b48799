//! The HTTP port's own defences: the dashboard cannot be framed or have its content sniffed,
//! and with `GE_ADMIN_READ_TOKEN` nothing but the probes, the dashboard's page and the API
//! document is read without a token.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{ROUTING, TestEnv, http};

const ADMIN: &str = "admin-S3cret";
const READ: &str = "read-S3cret";

/// (status, lower-cased head) of a GET with an optional bearer token.
async fn head(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    (head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), head)
}

#[tokio::test]
async fn the_dashboard_sends_security_headers() {
    let env = TestEnv::start(ROUTING).await;
    let (_replica, port) = env.serve_process("sec-1", &[], None).await;
    let (code, h) = head(port, "/", None).await;
    assert_eq!(code, 200);
    let csp = h.lines().find_map(|l| l.strip_prefix("content-security-policy: ")).unwrap_or_else(|| panic!("no CSP:\n{h}"));
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"), "{csp}");
    assert!(h.contains("\r\nx-frame-options: deny"), "{h}");
    assert!(h.contains("\r\nx-content-type-options: nosniff"), "{h}");
    let (_, h) = head(port, "/api/overview", None).await;
    assert!(h.contains("\r\nx-content-type-options: nosniff"), "{h}");
}

#[tokio::test]
async fn a_read_token_guards_every_read_but_the_probes() {
    let env = TestEnv::start(ROUTING).await;
    let (_replica, port) = env.serve_process("sec-2", &[("GE_ADMIN_TOKEN", ADMIN), ("GE_ADMIN_READ_TOKEN", READ)], None).await;
    let reads =
        ["/api/overview", "/api/work-packages", "/api/work-packages/x", "/api/deadletters", "/api/agents", "/api/replicas", "/metrics"];
    for path in reads {
        for token in [None, Some("wrong")] {
            let (code, h) = head(port, path, token).await;
            assert_eq!(code, 401, "{path} with {token:?}");
            assert!(h.contains("\r\nwww-authenticate: bearer"), "{path}: {h}");
        }
        let (code, _) = head(port, path, Some(READ)).await;
        assert!(code == 200 || (path.ends_with("/x") && code == 404), "{path} with the read token: {code}");
        let (code, _) = head(port, path, Some(ADMIN)).await;
        assert!(code == 200 || (path.ends_with("/x") && code == 404), "{path} with the admin token: {code}");
    }
    for open in ["/healthz", "/readyz", "/", "/api/openapi.json"] {
        assert_eq!(head(port, open, None).await.0, 200, "{open} stays open");
    }
    // The read token changes nothing.
    let (code, v) = http(port, "POST", "/api/reload", Some(READ), None).await;
    assert_eq!(code, 401, "{v}");
    let (code, v) = http(port, "GET", "/api/overview", None, None).await;
    assert!(v["error"].as_str().unwrap().contains("GE_ADMIN_READ_TOKEN"), "{code} {v}");
}
