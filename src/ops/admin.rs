//! The admin API: JSON over HTTP under `/api`, described by `openapi.json` (served at
//! `/api/openapi.json`). Reads are open, like `/metrics`, unless the replica has a read token
//! (`GE_ADMIN_READ_TOKEN`); every call that changes something needs
//! `Authorization: Bearer $GE_ADMIN_TOKEN`, and is refused outright when the replica has no
//! token configured.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::core::entry;
use crate::core::status::STATUSES;
use crate::engine::context::Ctx;
use crate::engine::controls::{self, PauseScope};
use crate::engine::dispatch::{self, Scope};
use crate::engine::{budgets, config_watch, store, streams};
use crate::ops::operations::{self, Door, OpError};
use crate::ops::{actions, activity, reads};

pub const OPENAPI: &str = include_str!("../../openapi.json");

/// An error answer: a status and a sentence for the operator.
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        // Every 401 of the API asks for a bearer token.
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<actions::OpsError> for ApiError {
    fn from(e: actions::OpsError) -> Self {
        tracing::warn!(error = %e, "admin API call failed");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}
impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NotFound(why) => ApiError(StatusCode::NOT_FOUND, why),
            OpError::Conflict(why) => ApiError(StatusCode::CONFLICT, why),
            OpError::Invalid(why) => ApiError(StatusCode::BAD_REQUEST, why),
            OpError::Db(e) => e.into(),
            OpError::Redis(e) => e.into(),
        }
    }
}
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        actions::OpsError::from(e).into()
    }
}
impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        actions::OpsError::from(e).into()
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// `Query` whose rejection is a JSON error like every other answer of the API.
pub(crate) struct Q<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(t)) => Ok(Q(t)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }
}

/// One path parameter, with a JSON rejection.
pub(crate) struct P(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for P {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(t)) => Ok(P(t)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }
}

/// Two path parameters, with a JSON rejection.
pub(crate) struct P2(String, String);

impl<S: Send + Sync> FromRequestParts<S> for P2 {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(String, String)>::from_request_parts(parts, state).await {
            Ok(Path((a, b))) => Ok(P2(a, b)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }
}

/// The most rows or entries one read returns: what one page of the dashboard shows. A read
/// holds a pooled PostgreSQL connection, or Redis itself, for as long as it takes.
pub(crate) const MAX_WORK_PACKAGES: i64 = 1000;
pub(crate) const MAX_DEADLETTERS: i64 = 500;

fn check_limit(limit: Option<i64>, max: i64) -> Result<(), ApiError> {
    match limit {
        Some(n) if !(1..=max).contains(&n) => Err(ApiError(StatusCode::BAD_REQUEST, format!("limit must be between 1 and {max}"))),
        _ => Ok(()),
    }
}

pub(crate) fn ok(v: impl serde::Serialize) -> ApiResult {
    Ok(Json(v).into_response())
}

/// Compares the SHA-256 digests of the two, without an early exit: the time taken tells
/// neither how much of a guess was right nor how long the token is.
fn same(a: &[u8], b: &[u8]) -> bool {
    let digest = |x: &[u8]| ring::digest::digest(&ring::digest::SHA256, x);
    let (a, b) = (digest(a), digest(b));
    a.as_ref().iter().zip(b.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` header. RFC 9110: the scheme is
/// case-insensitive and one or more spaces follow it.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether the request carries one of `tokens` as its bearer token. Both sides are compared
/// trimmed: a configured token read from a file often ends in a newline (`settings` warns of
/// it, and refuses one that is empty without it). Every configured token is compared, so the
/// time taken does not tell which one matched.
fn bearer_is(headers: &HeaderMap, tokens: &[Option<&str>]) -> bool {
    let Some(given) = bearer_token(headers).filter(|t| !t.is_empty()) else { return false };
    tokens.iter().flatten().map(|t| t.trim()).filter(|t| !t.is_empty()).fold(false, |hit, t| same(given.as_bytes(), t.as_bytes()) | hit)
}

/// A 401 that says which token to send.
fn unauthorized(which: &str) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, format!("send Authorization: Bearer <{which}>"))
}

pub(crate) fn authorize(ctx: &Ctx, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = ctx.settings.admin_token.as_deref() else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "this replica has no admin token; set GE_ADMIN_TOKEN in its environment to allow changes through the API".into(),
        ));
    };
    if bearer_is(headers, &[Some(expected)]) { Ok(()) } else { Err(unauthorized("GE_ADMIN_TOKEN")) }
}

/// Guards the reads (the API's, `/metrics`) when the replica has a read token: they need it,
/// or the admin token.
pub(crate) async fn require_read_token(State(ctx): State<Arc<Ctx>>, req: Request, next: Next) -> Response {
    let s = &ctx.settings;
    match s.admin_read_token.as_deref() {
        Some(read) if !bearer_is(req.headers(), &[Some(read), s.admin_token.as_deref()]) => {
            unauthorized("GE_ADMIN_READ_TOKEN (or GE_ADMIN_TOKEN)").into_response()
        }
        _ => next.run(req).await,
    }
}

fn valid_wp(wp_id: &str) -> Result<(), ApiError> {
    if entry::is_valid_wp_id(wp_id) {
        Ok(())
    } else {
        Err(ApiError(StatusCode::BAD_REQUEST, format!("{} is not a valid wp_id", entry::excerpt(wp_id))))
    }
}

/// Dispatches what an operator's action may have made possible now, rather than at the
/// scheduler's next sweep: `wp_ids` and whatever waits for a slot, or (None) a sweep from the
/// start of the incoming order.
async fn nudge(ctx: &Ctx, wp_ids: Option<Vec<String>>) {
    let scope = match wp_ids {
        Some(wp_ids) => Scope { wp_ids, sweep_from: None, ready: dispatch::Ready::All },
        None => Scope::sweep(dispatch::SWEEP_START),
    };
    if let Err(e) = dispatch::round(ctx, &scope).await {
        tracing::warn!(error = format!("{e:#}"), "dispatch after an operator action failed; the scheduler will retry");
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn overview(State(ctx): State<Arc<Ctx>>) -> ApiResult {
    let mut redis = ctx.redis.clone();
    let deadletters = streams::len(&mut redis, &ctx.settings.names.deadletter).await?;
    let counts: serde_json::Map<String, serde_json::Value> =
        reads::counts(&ctx.ops_pool).await?.into_iter().map(|(s, n)| (s, n.into())).collect();
    let routing = ctx.routing.get();
    ok(json!({
        "counts": counts,
        "deadletters": deadletters,
        "config_version": routing.config_version,
        "replica": ctx.consumer,
        "retention": {
            "work_packages": ctx.settings.retention.retention.to_string(),
            "seconds": ctx.settings.retention.retention.0.map(|d| d.as_secs()),
            "triggers": ctx.settings.retention.describe_triggers(),
        },
    }))
}

#[derive(Deserialize)]
struct ActivityQuery {
    minutes: Option<i64>,
}

async fn activity(State(ctx): State<Arc<Ctx>>, Q(q): Q<ActivityQuery>) -> ApiResult {
    let minutes = q.minutes.unwrap_or(60);
    if !(1..=activity::MAX_MINUTES).contains(&minutes) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("minutes must be between 1 and {}", activity::MAX_MINUTES)));
    }
    ok(json!({ "minutes": minutes, "buckets": activity::activity(&ctx.ops_pool, minutes).await? }))
}

async fn list_wps(State(ctx): State<Arc<Ctx>>, Q(f): Q<reads::Filter>) -> ApiResult {
    check_limit(f.limit, MAX_WORK_PACKAGES)?;
    if let Some(s) = f.status.as_deref().filter(|s| !STATUSES.contains(s)) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("unknown status {}; one of {}", entry::excerpt(s), STATUSES.join(", "))));
    }
    // PostgreSQL text cannot hold NUL, so no stored value has one; it would only make the
    // query fail.
    let filters = [&f.wp_id, &f.status, &f.lane, &f.agent, &f.prefix, &f.plan];
    if filters.iter().any(|v| v.as_deref().is_some_and(|s| s.contains('\0'))) {
        return ok(Vec::<reads::WpView>::new());
    }
    ok(reads::list(&ctx.ops_pool, &f).await?)
}

async fn one_wp(State(ctx): State<Arc<Ctx>>, P(wp_id): P) -> ApiResult {
    valid_wp(&wp_id)?;
    let views = reads::work_packages(&ctx.ops_pool, Some(&wp_id), 1).await?;
    let (Some(view), Some(detail)) = (views.into_iter().next(), reads::detail(&ctx.ops_pool, &wp_id).await?) else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no work package {wp_id}")));
    };
    let history = reads::history(&ctx.ops_pool, &wp_id).await?;
    let mut v = serde_json::to_value(view).unwrap_or_default();
    if let (Some(obj), Ok(serde_json::Value::Object(d))) = (v.as_object_mut(), serde_json::to_value(detail)) {
        obj.extend(d);
        obj.insert("history".into(), serde_json::to_value(history).unwrap_or_default());
    }
    ok(v)
}

async fn retry(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(wp_id): P) -> ApiResult {
    authorize(&ctx, &headers)?;
    valid_wp(&wp_id)?;
    operations::retry(&mut Door::of(&ctx), &wp_id).await?;
    ok(json!({ "wp_id": wp_id, "retried": true }))
}

async fn cancel(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(wp_id): P) -> ApiResult {
    authorize(&ctx, &headers)?;
    valid_wp(&wp_id)?;
    let out = operations::cancel(&mut Door::of(&ctx), store::Roots::One(&wp_id)).await?;
    ok(json!({ "wp_id": wp_id, "cancelled": out.cancelled, "running": out.running, "not_told": out.not_told }))
}

async fn skip(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(wp_id): P) -> ApiResult {
    authorize(&ctx, &headers)?;
    valid_wp(&wp_id)?;
    let unblocked = operations::skip(&mut Door::of(&ctx), &wp_id).await?;
    ok(json!({ "wp_id": wp_id, "skipped": true, "may_unblock": unblocked }))
}

#[derive(Deserialize)]
struct DeadLetterQuery {
    limit: Option<i64>,
    reason: Option<String>,
}

async fn list_deadletters(State(ctx): State<Arc<Ctx>>, Q(q): Q<DeadLetterQuery>) -> ApiResult {
    let mut redis = ctx.redis.clone();
    check_limit(q.limit, MAX_DEADLETTERS)?;
    let reason = q.reason.as_deref().filter(|r| !r.is_empty());
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_DEADLETTERS) as usize;
    ok(actions::deadletters(&mut redis, &ctx.settings.names.deadletter, limit, reason).await?)
}

/// `ms-seq`, digits only: anything else Redis would refuse, and that is the caller's error.
fn valid_stream_id(id: &str) -> Result<(), ApiError> {
    let digits = |s: &str| (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok();
    match id.split_once('-') {
        Some((ms, seq)) if digits(ms) && digits(seq) => Ok(()),
        _ => Err(ApiError(StatusCode::BAD_REQUEST, format!("{} is not a stream entry id (like 1700000000000-0)", entry::excerpt(id)))),
    }
}

async fn requeue_one(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(id): P) -> ApiResult {
    authorize(&ctx, &headers)?;
    valid_stream_id(&id)?;
    let mut redis = ctx.redis.clone();
    let outcome = actions::requeue(&mut redis, &ctx.settings.names, &id).await?;
    match &outcome {
        actions::Requeue::Requeued { stream, new_id, .. } => {
            tracing::info!(deadletter_id = %id, stream = %stream, new_id = %new_id, "dead letter requeued by an operator");
            ok(outcome)
        }
        actions::Requeue::NotFound { .. } => Err(ApiError(StatusCode::NOT_FOUND, format!("no dead letter {id} (already requeued?)"))),
        actions::Requeue::Empty { .. } => {
            Err(ApiError(StatusCode::CONFLICT, format!("dead letter {id} has no original fields to send again")))
        }
        actions::Requeue::Cut { .. } => Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "dead letter {id} was cut when it was written (see `cut` and `dropped_fields`): it no longer holds the whole \
                 entry, so it cannot be sent again; resubmit the entry from its source"
            ),
        )),
    }
}

async fn requeue_all(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, Q(q): Q<DeadLetterQuery>) -> ApiResult {
    authorize(&ctx, &headers)?;
    let mut redis = ctx.redis.clone();
    let outcomes = actions::requeue_all(&mut redis, &ctx.settings.names, q.reason.as_deref().filter(|r| !r.is_empty())).await?;
    let requeued = outcomes.iter().filter(|o| matches!(o, actions::Requeue::Requeued { .. })).count();
    tracing::info!(requeued, "dead letters requeued by an operator");
    ok(json!({ "requeued": requeued, "results": outcomes }))
}

async fn agents(State(ctx): State<Arc<Ctx>>) -> ApiResult {
    ok(actions::agents(&ctx.ops_pool, &ctx.routing.get()).await?)
}

async fn replicas(State(ctx): State<Arc<Ctx>>) -> ApiResult {
    let mut redis = ctx.redis.clone();
    // Three missed heartbeats (of this replica's interval) make a replica not live.
    let stale = (ctx.settings.health_interval * 3).max(Duration::from_secs(3));
    ok(actions::replicas(&mut redis, &ctx.settings.names.health, stale, 1000).await?)
}

/// The scope and name of a pause route, checked.
fn pause_target(scope: &str, name: &str) -> Result<PauseScope, ApiError> {
    let scope: PauseScope = scope.parse().map_err(|e: controls::UnknownScope| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if name.is_empty() || name.chars().count() > 128 || name.contains('\0') {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("{} name must be 1 to 128 characters, without NUL", scope.as_str())));
    }
    Ok(scope)
}

#[derive(Deserialize, Default)]
struct PauseBody {
    reason: Option<String>,
}

async fn list_pauses(State(ctx): State<Arc<Ctx>>) -> ApiResult {
    ok(controls::pauses(&ctx.ops_pool).await?)
}

async fn pause(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P2(scope, name): P2, body: axum::body::Bytes) -> ApiResult {
    authorize(&ctx, &headers)?;
    let scope = pause_target(&scope, &name)?;
    let body: PauseBody = if body.iter().all(u8::is_ascii_whitespace) {
        PauseBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("the body must be {{\"reason\": \"...\"}}: {e}")))?
    };
    if body.reason.as_ref().is_some_and(|r| r.chars().count() > 1000 || r.contains('\0')) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "reason must be at most 1000 characters, without NUL".into()));
    }
    ok(operations::pause(&ctx.pool, scope, &name, body.reason.as_deref()).await?)
}

async fn resume(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P2(scope, name): P2) -> ApiResult {
    authorize(&ctx, &headers)?;
    let scope = pause_target(&scope, &name)?;
    ok(operations::resume(&mut Door::of(&ctx), scope, &name).await?)
}

async fn reload(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> ApiResult {
    authorize(&ctx, &headers)?;
    // This replica reloads now, so the answer says whether the file was taken; the others
    // follow the signal.
    let taken = config_watch::reload(&ctx);
    let mut redis = ctx.redis.clone();
    let receivers = streams::request_reload(&mut redis, &ctx.settings.names.reload_channel).await?;
    let routing = ctx.routing.get();
    if !taken {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the routing file is invalid and was refused (see the replica's log); routing {} stays in force",
                routing.config_version
            ),
        ));
    }
    nudge(&ctx, None).await;
    ok(json!({ "config_version": routing.config_version, "signalled": receivers }))
}

#[derive(Deserialize)]
struct RerunQuery {
    downstream: Option<bool>,
}

/// (v1.6) Runs finished work again, with `?downstream=true` what depends on it too.
async fn rerun(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(wp_id): P, Q(q): Q<RerunQuery>) -> ApiResult {
    authorize(&ctx, &headers)?;
    valid_wp(&wp_id)?;
    let reopened = operations::rerun(&mut Door::of(&ctx), &wp_id, q.downstream.unwrap_or(false)).await?;
    ok(json!({ "wp_id": wp_id, "rerun": reopened }))
}

/// (v1.6) Cancels every open, failed or running work package of a plan, and its dependents.
async fn cancel_plan(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(plan): P) -> ApiResult {
    authorize(&ctx, &headers)?;
    if plan.is_empty() || plan.chars().count() > 128 || plan.contains('\0') {
        return Err(ApiError(StatusCode::BAD_REQUEST, "a plan name is 1 to 128 bytes, without NUL".into()));
    }
    let out = operations::cancel(&mut Door::of(&ctx), store::Roots::Plan(&plan)).await?;
    ok(json!({ "plan": plan, "cancelled": out.cancelled, "running": out.running, "not_told": out.not_told }))
}

/// (v1.6) Spend per agent and plan and every budget, as `status` shows them.
async fn spend(State(ctx): State<Arc<Ctx>>) -> ApiResult {
    let routing = ctx.routing.get();
    ok(budgets::overview(&ctx.ops_pool, Some(&routing), ctx.settings.budget_warn_ratio(), 100).await?)
}

#[derive(Deserialize)]
struct BudgetBody {
    usd: String,
}

/// The plan of a budget route, checked.
fn budget_plan(plan: &str) -> Result<(), ApiError> {
    if plan.is_empty() || plan.len() > 128 || plan.contains('\0') {
        return Err(ApiError(StatusCode::BAD_REQUEST, "a plan is 1 to 128 bytes, without NUL".into()));
    }
    Ok(())
}

/// (v1.6) Sets a plan's budget; work it held goes at once when the new budget allows it.
async fn set_budget(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(plan): P, body: axum::body::Bytes) -> ApiResult {
    authorize(&ctx, &headers)?;
    budget_plan(&plan)?;
    let body: BudgetBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("the body must be {{\"usd\": \"25.00\"}}: {e}")))?;
    let usd = crate::core::usage::parse_usd(&body.usd).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("usd {e}")))?;
    let now = budgets::set_plan(&ctx.pool, &plan, Some(&usd)).await?;
    ctx.plan_budgets.forget();
    tracing::info!(plan = %plan, usd = %usd, "budget set by an operator");
    nudge(&ctx, None).await;
    ok(now)
}

/// (v1.6) Removes a plan's budget; work it held goes at once.
async fn remove_budget(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, P(plan): P) -> ApiResult {
    authorize(&ctx, &headers)?;
    budget_plan(&plan)?;
    budgets::set_plan(&ctx.pool, &plan, None).await?;
    tracing::info!(plan = %plan, "budget removed by an operator");
    nudge(&ctx, None).await;
    ok(json!({ "plan": plan, "limit": null }))
}

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    let reads = Router::new()
        .route("/api/overview", get(overview))
        .route("/api/activity", get(activity))
        .route("/api/work-packages", get(list_wps))
        .route("/api/work-packages/{wp_id}", get(one_wp))
        .route("/api/deadletters", get(list_deadletters))
        .route("/api/agents", get(agents))
        .route("/api/replicas", get(replicas))
        .route("/api/pauses", get(list_pauses))
        .route("/api/spend", get(spend))
        .route_layer(axum::middleware::from_fn_with_state(ctx.clone(), require_read_token));
    // Each change checks the admin token itself; the API document is public anyway.
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/work-packages/{wp_id}/retry", post(retry))
        .route("/api/work-packages/{wp_id}/cancel", post(cancel))
        .route("/api/work-packages/{wp_id}/skip", post(skip))
        .route("/api/work-packages/{wp_id}/rerun", post(rerun))
        .route("/api/plans/{plan}/cancel", post(cancel_plan))
        .route("/api/deadletters/requeue", post(requeue_all))
        .route("/api/deadletters/{id}/requeue", post(requeue_one))
        .route("/api/reload", post(reload))
        .route("/api/pauses/{scope}/{name}", post(pause))
        .route("/api/pauses/{scope}/{name}", delete(resume))
        .route("/api/budgets/{plan}", post(set_budget))
        .route("/api/budgets/{plan}", delete(remove_budget))
        .merge(reads)
        .with_state(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, header::HeaderValue::from_str(value).unwrap());
        h
    }

    /// RFC 9110: the scheme is case-insensitive, and one or more spaces follow it.
    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        for given in ["Bearer tok-1", "bearer tok-1", "BEARER tok-1", "bEaReR  tok-1"] {
            assert!(bearer_is(&with_auth(given), &[Some("tok-1")]), "{given}");
        }
        for given in ["Basic tok-1", "Bearertok-1", "tok-1", "Bearer tok-2", "Bearer ", "Bearer tok-1x"] {
            assert!(!bearer_is(&with_auth(given), &[Some("tok-1")]), "{given}");
        }
    }

    /// A token read from a file or a secret often ends in a newline: the configured token is
    /// trimmed like the presented one.
    #[test]
    fn a_configured_token_with_whitespace_still_matches() {
        assert!(bearer_is(&with_auth("Bearer tok-1"), &[Some("tok-1\n")]));
        assert!(bearer_is(&with_auth("Bearer tok-1"), &[None, Some(" tok-1 ")]));
        assert!(!bearer_is(&with_auth("Bearer "), &[Some("\n")]), "an empty token matches nothing");
    }
}
