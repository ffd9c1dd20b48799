//! The replica's HTTP port: `/healthz` (the process is alive) and `/readyz` (Redis and
//! PostgreSQL answer and the group is joined), for load balancers and Kubernetes probes;
//! `/metrics` for Prometheus; the admin API under `/api` and the dashboard at `/`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::engine::context::Ctx;
use crate::engine::streams;
use crate::ops::reads;

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(ctx): State<Arc<Ctx>>) -> (StatusCode, Json<serde_json::Value>) {
    let mut redis = ctx.redis.clone();
    let redis_ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, streams::ping(&mut redis)).await, Ok(Ok(())));
    let pg_ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, reads::ping(&ctx.ops_pool)).await, Ok(true));
    let joined = ctx.group_joined.load(Ordering::Relaxed);
    let ready = redis_ok && pg_ok && joined;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({
            "ready": ready,
            "redis": word(redis_ok),
            "postgres": word(pg_ok),
            "group": if joined { "joined" } else { "not joined" },
            "consumer": ctx.consumer,
        })),
    )
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::ops::metrics::render(&ctx).await)
}

const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], DASHBOARD)
}

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx.clone())
        .merge(crate::ops::admin::router(ctx))
}

/// Serves until shutdown. The listener is bound by the caller so a bad address fails start-up.
pub(crate) async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Ctx>, token: CancellationToken) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "serving /healthz, /readyz, /metrics, /api and the dashboard");
    if let Err(e) = axum::serve(listener, router(ctx)).with_graceful_shutdown(token.cancelled_owned()).await {
        tracing::error!(error = %e, "the HTTP server stopped");
    }
}
