//! The replica's HTTP port: `/healthz` (the process is alive) and `/readyz` (Redis and
//! PostgreSQL answer and the group is joined), for load balancers and Kubernetes probes;
//! `/metrics` for Prometheus; the admin API under `/api` and the dashboard at `/`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::context::Ctx;
use crate::engine::streams;
use crate::ops::reads;

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(ctx): State<Arc<Ctx>>) -> (StatusCode, Json<serde_json::Value>) {
    let mut redis = ctx.redis.clone();
    let redis_ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, streams::ping(&mut redis)).await, Ok(Ok(())));
    let pg_ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, reads::ping(&ctx.ops_pool)).await, Ok(true));
    let joined = ctx.group_joined.load(Ordering::Relaxed);
    let standing_down = ctx.duty.standing_down();
    let ready = redis_ok && pg_ok && joined && standing_down.is_none();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({
            "ready": ready,
            "redis": word(redis_ok),
            "postgres": word(pg_ok),
            "group": if joined { "joined" } else { "not joined" },
            "duty": if standing_down.is_some() { "standing down" } else { "on duty" },
            "reason": standing_down,
            "consumer": ctx.consumer,
        })),
    )
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::ops::metrics::render(&ctx).await)
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// The dashboard's Content-Security-Policy: its one inline script by hash (whatever a dead
/// letter smuggles into the page cannot run), inline styles (it colours and sizes elements
/// one by one), requests to this replica only, and no page may frame it (clickjacking of its
/// requeue and cancel buttons).
static DASHBOARD_CSP: LazyLock<String> = LazyLock::new(|| {
    use base64::Engine;
    let script = DASHBOARD.split_once("<script>").and_then(|(_, rest)| rest.split_once("</script>")).map(|(s, _)| s).unwrap_or_default();
    let hash = base64::engine::general_purpose::STANDARD.encode(ring::digest::digest(&ring::digest::SHA256, script.as_bytes()));
    format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
});

async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP.as_str()),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        DASHBOARD,
    )
}

/// No browser may guess another type than the one sent (JSON shown as HTML, say).
async fn nosniff(mut response: Response) -> Response {
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    response
}

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    let request_timeout = ctx.settings.http_request_timeout;
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(ctx.clone(), crate::ops::admin::require_read_token));
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(metrics)
        .with_state(ctx.clone())
        .merge(crate::ops::schedules::router(ctx.clone()))
        .merge(crate::ops::admin::router(ctx))
        .layer(axum::middleware::from_fn(move |req, next| within(request_timeout, req, next)))
        .layer(axum::middleware::map_response(nosniff))
}

/// What the port allows one client and all of them.
#[derive(Clone, Copy)]
struct Limits {
    header: Duration,
    request: Duration,
    connections: usize,
}

/// Answers 503 when the handler has not answered within `limit`: whatever it waits for
/// (PostgreSQL, Redis) is dropped with it.
async fn within(limit: Duration, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            let error = format!("the request took longer than {}; try again later or ask for less", humantime::format_duration(limit));
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": error }))).into_response()
        }
    }
}

/// A client connection whose writes may stall for at most `limit`: a client that stops
/// reading a response would otherwise hold the connection, and the response, forever.
struct StallGuard {
    inner: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StallGuard {
    fn new(inner: TcpStream, limit: Duration) -> Self {
        StallGuard { inner, limit, stalled: None }
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading the response"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, poll)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, poll)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One connection too many: a 503 if the socket takes it at once, and closed.
fn refuse(stream: TcpStream) {
    const BODY: &str = r#"{"error":"too many connections to this replica; try again"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(response.as_bytes());
    tracing::debug!("refused an HTTP connection: --http-max-connections are open");
}

/// Serves until shutdown. The listener is bound by the caller so a bad address fails start-up.
///
/// Its own accept loop rather than `axum::serve`, which gives a client unlimited time to send
/// its headers and serves any number of connections: here a client has the header timeout to
/// send a request (an idle connection is closed after as long), the request timeout for the
/// answer and for each stall of its writing, and connections beyond the cap are refused.
pub(crate) async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Ctx>, token: CancellationToken) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "serving /healthz, /readyz, /metrics, /api and the dashboard");
    let s = &ctx.settings;
    let limits = Limits { header: s.http_header_timeout, request: s.http_request_timeout, connections: s.http_max_connections };
    let app = router(ctx.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header);
    let permits = Arc::new(Semaphore::new(limits.connections));
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close rather than spin.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = token.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(StallGuard::new(stream, limits.request)), TowerToHyperService::new(app.clone()));
        let token = token.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "an HTTP connection ended with an error");
            }
        });
    }
    connections.close();
    // Idle connections close at once; a request in hand gets a few seconds, not the whole
    // request timeout: the replica's drain has to fit in the termination grace period.
    if tokio::time::timeout(limits.request.min(SHUTDOWN_GRACE), connections.wait()).await.is_err() {
        tracing::warn!("HTTP connections still open at shutdown were dropped");
    }
}
