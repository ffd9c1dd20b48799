//! The admin API's schedules (contract v1.6): list them with their next firing, add or replace
//! one (`PUT`, the plan's YAML text in the body), remove, pause and resume one. Changes need
//! the admin token like every other change.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post, put};
use serde_json::json;

use crate::core::entry;
use crate::engine::context::Ctx;
use crate::engine::schedule_store::{self, Definition, Refused};
use crate::ops::admin::{ApiError, ApiResult, P, authorize, ok, require_read_token};

impl From<Refused> for ApiError {
    fn from(e: Refused) -> Self {
        match e {
            Refused::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            Refused::Exists(_) | Refused::TooMany => ApiError(StatusCode::CONFLICT, e.to_string()),
            Refused::Db(e) => e.into(),
        }
    }
}

/// A name no schedule can have is the caller's error, before it reaches PostgreSQL.
fn valid_name(name: &str) -> Result<(), ApiError> {
    crate::core::schedule::check_name(name).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

fn not_found(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no schedule {}", entry::excerpt(name)))
}

async fn list(State(ctx): State<Arc<Ctx>>) -> ApiResult {
    ok(schedule_store::list(&ctx.ops_pool).await?)
}

async fn put_one(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(name): P, body: axum::body::Bytes) -> ApiResult {
    authorize(&ctx, &headers)?;
    valid_name(&name)?;
    let def: Definition = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body must be {{\"cron\": \"...\", \"plan\": \"<the plan's YAML>\", \"timezone\", \"missed\", \"overlap\", \"paused\"}}: {e}"),
        )
    })?;
    let replaced = schedule_store::put(&ctx.pool, &name, &def, true).await?;
    tracing::info!(schedule = %name, replaced, "schedule set by an operator");
    let view = schedule_store::list(&ctx.pool).await?.into_iter().find(|s| s.name == name);
    ok(json!({ "replaced": replaced, "schedule": view }))
}

async fn remove(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(name): P) -> ApiResult {
    authorize(&ctx, &headers)?;
    valid_name(&name)?;
    if !schedule_store::remove(&ctx.pool, &name).await? {
        return Err(not_found(&name));
    }
    tracing::info!(schedule = %name, "schedule removed by an operator");
    ok(json!({ "name": name, "removed": true }))
}

async fn set_paused(ctx: &Ctx, headers: &HeaderMap, name: &str, paused: bool) -> ApiResult {
    authorize(ctx, headers)?;
    valid_name(name)?;
    let Some(view) = schedule_store::set_paused(&ctx.pool, name, paused).await? else { return Err(not_found(name)) };
    tracing::info!(schedule = %name, paused, "schedule paused or resumed by an operator");
    ok(view)
}

async fn pause(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(name): P) -> ApiResult {
    set_paused(&ctx, &headers, &name, true).await
}

async fn resume(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(name): P) -> ApiResult {
    set_paused(&ctx, &headers, &name, false).await
}

/// The schedules' part of the admin API, beside `admin::router`: reads behind the read token,
/// changes checking the admin token themselves.
pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    let reads =
        Router::new().route("/api/schedules", get(list)).route_layer(axum::middleware::from_fn_with_state(ctx.clone(), require_read_token));
    Router::new()
        .route("/api/schedules/{name}", put(put_one))
        .route("/api/schedules/{name}", delete(remove))
        .route("/api/schedules/{name}/pause", post(pause))
        .route("/api/schedules/{name}/resume", post(resume))
        .merge(reads)
        .with_state(ctx)
}
