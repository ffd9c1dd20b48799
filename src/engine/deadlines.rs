//! Dispatch deadlines (contract v1.1). A dispatch to an agent (or of a work type) with a
//! `timeout` must be reported on in time, or the scheduler counts the attempt as a retryable
//! failure and frees its slot, so a hung agent cannot hold work or capacity forever. An agent
//! still at work says so on the heartbeat stream, which moves the deadline. A report that
//! arrives after its attempt was expired is for an older dispatch and is ignored, as any
//! stale report is.

use std::time::Duration;

use crate::core::entry::{self, StreamEntry};
use crate::core::wait;
use crate::engine::context::{Ctx, Stats};
use crate::engine::progress;
use crate::engine::store::{self, ReportOutcome};
use crate::engine::streams::DeadLetter;

/// Overdue dispatches handled per sweep; the rest wait for the next one.
const SWEEP_LIMIT: i64 = 500;

/// Expires every overdue dispatch; returns how many attempts were counted as failed.
pub(crate) async fn expire_overdue(ctx: &Ctx) -> anyhow::Result<usize> {
    let overdue = store::overdue(&ctx.pool, SWEEP_LIMIT).await?;
    if overdue.is_empty() {
        return Ok(0);
    }
    let policy = ctx.routing.get().retry.clone();
    let mut tx = ctx.pool.begin().await?;
    let mut expired = Vec::new();
    for o in &overdue {
        let timeout = humantime::format_duration(Duration::from_millis(o.timeout_ms.max(0) as u64));
        let error = format!("no report within the timeout of {timeout} for dispatch {}; counted as a failed attempt", o.dispatch_id);
        match store::expire(&mut tx, &o.wp_id, &o.dispatch_id, &error, &policy).await? {
            ReportOutcome::RetryWait { .. } | ReportOutcome::Failed => expired.push(o),
            _ => {}
        }
    }
    tx.commit().await?;
    for o in &expired {
        tracing::warn!(wp_id = %o.wp_id, dispatch_id = %o.dispatch_id, agent_id = %o.agent_id, timeout_ms = o.timeout_ms, "dispatch timed out; the attempt counts as failed");
        ctx.metrics.failed(&o.agent_id, &o.route);
    }
    Stats::add(&ctx.stats.failed, expired.len() as u64);
    Ok(expired.len())
}

/// Applies a batch of heartbeats: every valid one moves its dispatch's deadline in one
/// statement; one without `wp_id` or `dispatch_id` is dead-lettered.
pub(crate) async fn handle_heartbeats(ctx: &Ctx, entries: &[StreamEntry]) -> anyhow::Result<()> {
    let names = &ctx.settings.names;
    let (mut wp_ids, mut dispatch_ids, mut deadletters) = (Vec::new(), Vec::new(), Vec::new());
    let mut progress = Vec::new();
    for e in entries {
        let fields = e.fields.as_ref().ok_or_else(|| entry::Rejection::new("deleted", "the entry was deleted from the stream"));
        let parsed = fields.and_then(|raw| entry::decode_fields(raw, &ctx.settings.limits)).and_then(|f| {
            match (f.get("wp_id").filter(|w| entry::is_valid_wp_id(w)), f.get("dispatch_id").filter(|d| !d.is_empty() && !d.contains('\0')))
            {
                (Some(w), Some(d)) => {
                    let (text, fraction) =
                        wait::progress(f.get("progress").map(String::as_str), f.get("progress_fraction").map(String::as_str));
                    Ok((w.clone(), d.clone(), text, fraction))
                }
                _ => Err(entry::Rejection::new("invalid", "a heartbeat needs the wp_id and the dispatch_id of its trigger")),
            }
        });
        match parsed {
            Ok((w, d, text, fraction)) => {
                if text.is_some() || fraction.is_some() {
                    progress.push(progress::Report { wp_id: w.clone(), dispatch_id: d.clone(), text, fraction });
                }
                wp_ids.push(w);
                dispatch_ids.push(d);
            }
            Err(rej) => deadletters.push(DeadLetter::of(&names.heartbeat, e, rej.reason, rej.detail)),
        }
    }
    if !wp_ids.is_empty() {
        store::extend_deadlines(&ctx.pool, &wp_ids, &dispatch_ids).await?;
        progress::record(&ctx.pool, progress).await?;
    }
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    ctx.ack(&names.heartbeat, &ids, &deadletters).await?;
    Ok(())
}
