//! (v1.6) The admin API's approvals, events and live progress:
//!
//! - `POST /api/work-packages/{wp_id}/approve` and `/reject`, body `{"comment": "...", "by":
//!   "..."}` (both optional; `by` empty or absent is `admin-api`): the admin token is one
//!   shared secret, so who decides is what the caller says, and it goes into the history;
//! - `POST /api/events/{key}`, body a JSON object of text fields (or empty): the event's fields;
//! - `GET /api/progress/stream`: server-sent events, one `progress` event per progress report
//!   recorded, read every second; at most `MAX_STREAMS` at once per replica, each for at most
//!   `STREAM_LIFETIME` (an `EventSource` connects again by itself). A read, guarded like the
//!   other reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::engine::context::Ctx;
use crate::engine::progress;
use crate::engine::waits::Verdict;
use crate::ops::admin::{ApiError, ApiResult, P, authorize, require_read_token};
use crate::ops::operations::{self, Door};

/// Live progress streams one replica serves at once, and how long each lasts.
pub(crate) const MAX_STREAMS: usize = 32;
const STREAM_LIFETIME: Duration = Duration::from_secs(300);
/// How often a stream reads new progress, and the most reports one read sends.
const STREAM_EVERY: Duration = Duration::from_secs(1);
const STREAM_BATCH: i64 = 200;

/// The streams' permits of each replica (by consumer name: tests and the chaos tool run several
/// replicas in one process).
static STREAMS: LazyLock<Mutex<HashMap<String, Arc<Semaphore>>>> = LazyLock::new(Mutex::default);

fn permits(ctx: &Ctx) -> Arc<Semaphore> {
    let mut all = STREAMS.lock().unwrap_or_else(|p| p.into_inner());
    all.entry(ctx.consumer.clone()).or_insert_with(|| Arc::new(Semaphore::new(MAX_STREAMS))).clone()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    comment: Option<String>,
    by: Option<String>,
}

fn body_of<T: serde::de::DeserializeOwned + Default>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("the body must be {shape}: {e}")))
}

async fn decide(ctx: Arc<Ctx>, headers: HeaderMap, wp_id: String, body: axum::body::Bytes, verdict: Verdict) -> ApiResult {
    authorize(&ctx, &headers)?;
    let b: DecisionBody = body_of(&body, "{\"comment\": \"...\", \"by\": \"...\"}")?;
    // PostgreSQL stores no NUL: replaced, as in reports (contract v1.1).
    let clean = |t: String| t.replace('\0', "\u{FFFD}");
    let by = b.by.map(clean).filter(|b| !b.trim().is_empty()).unwrap_or_else(|| "admin-api".into());
    let comment = b.comment.map(clean);
    let unblocked = operations::decide(&mut Door::of(&ctx), &wp_id, &by, comment.as_deref(), verdict).await?;
    let done = if verdict == Verdict::Approve { "approved" } else { "rejected" };
    Ok(Json(json!({ "wp_id": wp_id, done: true, "by": by, "may_unblock": unblocked })).into_response())
}

async fn approve(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(wp_id): P, body: axum::body::Bytes) -> ApiResult {
    decide(ctx, headers, wp_id, body, Verdict::Approve).await
}

async fn reject(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(wp_id): P, body: axum::body::Bytes) -> ApiResult {
    decide(ctx, headers, wp_id, body, Verdict::Reject).await
}

async fn event(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(key): P, body: axum::body::Bytes) -> ApiResult {
    authorize(&ctx, &headers)?;
    let mut fields: BTreeMap<String, String> = body_of(&body, "a JSON object of text fields")?;
    let limits = &ctx.settings.limits;
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    if fields.len() > limits.max_fields || size > limits.max_payload_bytes {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("an event may have at most {} fields of {} bytes together", limits.max_fields, limits.max_payload_bytes),
        ));
    }
    // PostgreSQL stores no NUL: replaced, as in reports (contract v1.1).
    let clean = |t: &str| t.replace('\0', "\u{FFFD}");
    fields = fields.iter().map(|(k, v)| (clean(k), clean(v))).collect();
    fields.insert("key".into(), key.clone());
    let json = serde_json::Value::Object(fields.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect());
    let d = operations::event(&mut Door::of(&ctx), &key, &json).await?;
    Ok(Json(json!({ "key": key, "completed": d.completed, "kept": d.kept })).into_response())
}

async fn progress_stream(State(ctx): State<Arc<Ctx>>) -> Result<Response, ApiError> {
    let Ok(permit) = permits(&ctx).try_acquire_owned() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this replica serves at most {MAX_STREAMS} live progress streams at once; try again later"),
        ));
    };
    let started = tokio::time::Instant::now();
    let since = chrono::Utc::now().timestamp_micros() - 60_000_000;
    let state = (ctx, since, permit, None::<tokio::time::Instant>);
    let stream = futures_util::stream::unfold(state, move |(ctx, since, permit, last)| async move {
        if let Some(at) = last {
            tokio::time::sleep_until(at + STREAM_EVERY).await;
        }
        if started.elapsed() >= STREAM_LIFETIME {
            return None;
        }
        let read = tokio::time::Instant::now();
        let rows = match progress::since(&ctx.ops_pool, since, STREAM_BATCH).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "reading progress for a live stream failed");
                Vec::new()
            }
        };
        let next = rows.last().map_or(since, |r| r.at_us);
        let events: Vec<Result<Event, std::convert::Infallible>> =
            rows.iter().filter_map(|r| Event::default().event("progress").json_data(r).ok()).map(Ok).collect();
        Some((futures_util::stream::iter(events), (ctx, next, permit, Some(read))))
    });
    use futures_util::StreamExt;
    Ok(Sse::new(stream.flatten()).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    let reads = Router::new()
        .route("/api/progress/stream", get(progress_stream))
        .route_layer(axum::middleware::from_fn_with_state(ctx.clone(), require_read_token));
    Router::new()
        .route("/api/work-packages/{wp_id}/approve", post(approve))
        .route("/api/work-packages/{wp_id}/reject", post(reject))
        .route("/api/events/{key}", post(event))
        .merge(reads)
        .with_state(ctx)
}
