//! (v1.6) Work packages that wait for a person or an outside event instead of an agent. Once
//! its dependencies and lane let it go, such a work package is `waiting` (the dispatch round
//! puts it there, `dispatch::claim::enter_waiting`) until one of these ends it:
//!
//! - an operator approves it (it completes; its result is the approval as JSON) or rejects it
//!   (it fails, not retryable: its dependents and lane wait as for any failure);
//! - an event with its key arrives, on `ge:work:events` or through the API: it completes every
//!   work package waiting for that key, with the event's fields as its result. An event no
//!   work package waits for is kept (`kept_events`, bounded by age and count) and completes
//!   the work packages that come to wait for its key later;
//! - its `wait_timeout` passes: `on_timeout` completes or fails it.
//!
//! Plain functions of the pool, so the CLI and the admin API call the same code.

use std::collections::BTreeMap;

use sqlx::{PgPool, Row};

use crate::core::entry::{self, StreamEntry};
use crate::core::wait::{MAX_COMMENT_CHARS, MAX_WHO_CHARS, valid_key};
use crate::engine::context::{Ctx, Stats};
use crate::engine::dispatch::{self, Scope};
use crate::engine::kept_events::{self, Delivered};
use crate::engine::store::{ids_of, unblocked_by};
use crate::engine::streams::DeadLetter;

/// Timed-out waits handled per sweep; the rest wait for the next one.
const SWEEP_LIMIT: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("no work package {0}")]
    NotFound(String),
    #[error("{wp_id} is {status}, not waiting for an approval; {hint}")]
    NotWaiting { wp_id: String, status: String, hint: String },
    #[error("{0}")]
    Invalid(String),
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
}

fn check_text(what: &str, v: &str, max: usize) -> Result<(), WaitError> {
    if v.chars().count() > max || v.contains('\0') {
        return Err(WaitError::Invalid(format!("{what} must be at most {max} characters, without NUL")));
    }
    Ok(())
}

/// An operator's decision on a work package waiting for approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Reject,
}

/// Approves a work package waiting for an approval: it completes with the result
/// `{"approved": true, "by": WHO, "at": TIME, "comment": COMMENT}`, and its history says who.
/// Returns the work packages it may unblock.
pub async fn approve(pool: &PgPool, wp_id: &str, who: &str, comment: Option<&str>) -> Result<Vec<String>, WaitError> {
    decide(pool, wp_id, who, comment, Verdict::Approve).await
}

/// Rejects a work package waiting for an approval: it fails, not retryable (an operator may
/// still `retry` it, which makes it wait again), with the error `rejected by WHO: COMMENT`.
pub async fn reject(pool: &PgPool, wp_id: &str, who: &str, comment: Option<&str>) -> Result<Vec<String>, WaitError> {
    decide(pool, wp_id, who, comment, Verdict::Reject).await
}

async fn decide(pool: &PgPool, wp_id: &str, who: &str, comment: Option<&str>, verdict: Verdict) -> Result<Vec<String>, WaitError> {
    if !entry::is_valid_wp_id(wp_id) {
        return Err(WaitError::Invalid(format!("{} is not a valid wp_id", entry::excerpt(wp_id))));
    }
    let who = who.trim();
    if who.is_empty() {
        return Err(WaitError::Invalid("say who decides (by)".into()));
    }
    check_text("by", who, MAX_WHO_CHARS)?;
    check_text("comment", comment.unwrap_or_default(), MAX_COMMENT_CHARS)?;
    let comment = comment.map(str::trim).filter(|c| !c.is_empty());
    let words = match comment {
        Some(c) => format!("{} by {who}: {c}", if verdict == Verdict::Approve { "approved" } else { "rejected" }),
        None => format!("{} by {who}", if verdict == Verdict::Approve { "approved" } else { "rejected" }),
    };
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE work_packages SET
                status = CASE WHEN $2 THEN 'completed' ELSE 'failed' END,
                completed_at = CASE WHEN $2 THEN now() END, failed_at = CASE WHEN $2 THEN NULL ELSE now() END,
                result = jsonb_build_object('approved', $2, 'by', $3::text, 'comment', $4::text,
                                            'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))::text,
                wait_reason = CASE WHEN $2 THEN $5 END, last_error = CASE WHEN $2 THEN last_error ELSE $5 END,
                wait_due_at = NULL, updated_at = now()
         WHERE wp_id = $1 AND status COLLATE \"C\" = 'waiting' AND wait_for = 'approval'",
    )
    .bind(wp_id)
    .bind(verdict == Verdict::Approve)
    .bind(who)
    .bind(comment)
    .bind(&words)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if done == 0 {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT status, wait_for FROM work_packages WHERE wp_id = $1").bind(wp_id).fetch_optional(&mut *tx).await?;
        let Some((status, wait_for)) = row else { return Err(WaitError::NotFound(wp_id.to_string())) };
        let hint = match wait_for.as_deref() {
            None => "it goes to an agent (no wait_for: approval)".to_string(),
            Some("event") => "it waits for an event, which an event with its key ends".to_string(),
            _ if status == "blocked" || status == "retry_wait" => {
                "it waits for its dependencies or lane first; approve it once it is waiting".to_string()
            }
            _ => "only a waiting work package can be approved or rejected".to_string(),
        };
        return Err(WaitError::NotWaiting { wp_id: wp_id.to_string(), status, hint });
    }
    // Only a completion lets anything go (a rejection holds its dependents and lane), and
    // `unblocked_by` is told of completions only.
    let unblocked = if verdict == Verdict::Approve { ids_of(&unblocked_by(&mut tx, &[wp_id.to_string()]).await?) } else { Vec::new() };
    tx.commit().await?;
    tracing::info!(wp_id = %wp_id, by = %who, verdict = ?verdict, "approval decided by an operator");
    Ok(unblocked)
}

/// Delivers one event (see `kept_events::deliver`), once its key is known to be valid.
pub async fn deliver(pool: &PgPool, key: &str, fields: &serde_json::Value, source: Option<&str>) -> Result<Delivered, WaitError> {
    if !valid_key(key) {
        return Err(WaitError::Invalid(format!("event key {} must be 1 to 256 characters of printable text", entry::excerpt(key))));
    }
    Ok(kept_events::deliver(pool, key, fields, source).await?)
}

pub(crate) fn note(ctx: &Ctx, how: &str, n: usize) {
    ctx.metrics.waits_resolved(how, n as u64);
    if how != "rejected" {
        Stats::add(&ctx.stats.completed, n as u64);
    }
}

/// Applies a batch of `ge:work:events`: each entry needs a `key`; all its fields are the
/// event's (and so the result of the work packages it completes). Malformed entries are
/// dead-lettered as `invalid`.
pub(crate) async fn handle_events(ctx: &Ctx, entries: &[StreamEntry]) -> anyhow::Result<()> {
    let stream = &ctx.settings.names.events;
    let mut deadletters = Vec::new();
    let mut unblocked = Vec::new();
    let mut completed = 0;
    for e in entries {
        let dead = |detail: String| DeadLetter::of(stream, e, "invalid", detail);
        let Some(raw) = &e.fields else {
            deadletters.push(DeadLetter::of(stream, e, "deleted", "the entry was deleted from the stream before it was processed"));
            continue;
        };
        let fields = match event_fields(raw, ctx) {
            Ok(f) => f,
            Err(detail) => {
                deadletters.push(dead(detail));
                continue;
            }
        };
        let key = fields.get("key").cloned().unwrap_or_default();
        let json = serde_json::Value::Object(fields.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect());
        match deliver(&ctx.pool, &key, &json, Some(&format!("stream:{}", e.id))).await {
            Ok(d) => {
                completed += d.completed.len();
                unblocked.extend(d.unblocked);
            }
            Err(WaitError::Db(db)) => return Err(db.into()),
            Err(other) => deadletters.push(dead(other.to_string())),
        }
    }
    bound_kept(ctx).await?;
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    ctx.ack(stream, &ids, &deadletters).await?;
    note(ctx, "event", completed);
    if !unblocked.is_empty()
        && let Err(e) = dispatch::round(ctx, &Scope::ids(unblocked)).await
    {
        tracing::warn!(error = format!("{e:#}"), "dispatch after an event failed; the scheduler will retry");
    }
    Ok(())
}

/// The fields of an event entry, or why it cannot be one.
fn event_fields(raw: &entry::RawFields, ctx: &Ctx) -> Result<BTreeMap<String, String>, String> {
    let fields = entry::decode_fields(raw, &ctx.settings.limits).map_err(|r| r.detail)?;
    match fields.get("key") {
        Some(k) if valid_key(k) => {}
        Some(k) => return Err(format!("event key {} must be 1 to 256 characters of printable text", entry::excerpt(k))),
        None => return Err("an event needs a key field: the wait_key of the work packages it is for".into()),
    }
    if let Some((k, _)) = fields.iter().find(|(k, v)| k.contains('\0') || v.contains('\0')) {
        return Err(format!("field {} contains a NUL byte, which PostgreSQL cannot store", entry::excerpt(k)));
    }
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > ctx.settings.limits.max_payload_bytes {
        return Err(format!(
            "the event's fields are {size} bytes together; at most {} (GE_MAX_PAYLOAD_BYTES) are taken, since they become a result",
            ctx.settings.limits.max_payload_bytes
        ));
    }
    Ok(fields)
}

/// Drops kept events past `GE_EVENT_MAX_AGE`, and the oldest beyond `GE_EVENT_MAX_KEPT`;
/// counts and logs those dropped before any work package took them.
pub(crate) async fn bound_kept(ctx: &Ctx) -> Result<(), sqlx::Error> {
    let row = sqlx::query(
        "WITH old AS (DELETE FROM kept_events WHERE received_at < now() - make_interval(secs => $1::float8)
                      RETURNING consumed_at IS NULL AS unused),
              cut AS (SELECT id FROM kept_events ORDER BY id DESC OFFSET $2 LIMIT 1),
              many AS (DELETE FROM kept_events k USING cut WHERE k.id <= cut.id RETURNING k.consumed_at IS NULL AS unused)
         SELECT (SELECT count(*) FILTER (WHERE unused) FROM old) AS age, (SELECT count(*) FILTER (WHERE unused) FROM many) AS count",
    )
    .bind(ctx.settings.event_max_age.as_secs_f64())
    .bind(ctx.settings.event_max_kept.max(0))
    .fetch_one(&ctx.pool)
    .await?;
    for why in ["age", "count"] {
        let n: i64 = row.try_get(why)?;
        if n > 0 {
            tracing::warn!(dropped = n, bound = why, "events that no work package waited for were dropped at their bound");
            ctx.metrics.events_dropped(why, n as u64);
        }
    }
    Ok(())
}

/// The scheduler's part: waits whose timeout passed end as their `on_timeout` says; kept
/// events meet work that came to wait for them; the kept events stay within their bounds.
/// What this ends is dispatched onward at once. Returns how many waits it ended.
pub(crate) async fn sweep(ctx: &Ctx) -> anyhow::Result<usize> {
    let mut tx = ctx.pool.begin().await?;
    let timed_out: Vec<(String, String)> = sqlx::query_as(
        "WITH due AS MATERIALIZED (
             SELECT wp_id FROM work_packages WHERE status = 'waiting' AND wait_due_at <= now()
             ORDER BY wait_due_at LIMIT $1 FOR UPDATE SKIP LOCKED),
              said AS (SELECT w.wp_id, w.on_timeout = 'complete' AS ok,
                              'no ' || CASE WHEN w.wait_for = 'event' THEN 'event ' || w.wait_key ELSE 'approval' END
                              || ' within the wait_timeout of ' || (w.wait_timeout_ms / 1000.0)::numeric(20, 1) || ' s' AS words
                       FROM work_packages w JOIN due USING (wp_id))
         UPDATE work_packages w SET status = CASE WHEN s.ok THEN 'completed' ELSE 'failed' END,
                completed_at = CASE WHEN s.ok THEN now() END, failed_at = CASE WHEN s.ok THEN NULL ELSE now() END,
                result = CASE WHEN s.ok THEN jsonb_build_object('timeout', true, 'waited_ms', w.wait_timeout_ms)::text END,
                wait_reason = CASE WHEN s.ok THEN s.words || '; completed, as on_timeout says' END,
                last_error = CASE WHEN s.ok THEN w.last_error ELSE s.words || '; failed, as on_timeout says' END,
                wait_due_at = NULL, updated_at = now()
         FROM said s WHERE w.wp_id = s.wp_id
         RETURNING w.wp_id, w.status",
    )
    .bind(SWEEP_LIMIT)
    .fetch_all(&mut *tx)
    .await?;
    // Those that failed let nothing go; `unblocked_by` is told of completions only.
    let ended: Vec<String> = timed_out.iter().filter(|(_, s)| s == "completed").map(|(w, _)| w.clone()).collect();
    let mut unblocked = if ended.is_empty() { Vec::new() } else { ids_of(&unblocked_by(&mut tx, &ended).await?) };
    tx.commit().await?;
    for (wp_id, status) in &timed_out {
        tracing::warn!(wp_id = %wp_id, status = %status, "a wait timed out");
    }
    note(ctx, "timeout", timed_out.len());
    let (settled, more) = kept_events::settle_keys(&ctx.pool, None).await?;
    note(ctx, "event", settled.len());
    unblocked.extend(more);
    bound_kept(ctx).await?;
    if !unblocked.is_empty() {
        dispatch::round(ctx, &Scope::ids(unblocked)).await?;
    }
    Ok(timed_out.len() + settled.len())
}
