//! process_completions: apply `ge:work:completed` and `ge:work:failed` reports, then dispatch
//! what they unblock (dependents, the lane's next work package, work waiting for a slot).

use crate::core::entry::{self, StreamEntry};
use crate::engine::context::{Ctx, Stats};
use crate::engine::dispatch::{self, Scope};
use crate::engine::input::Input;
use crate::engine::store::{self, ReportOutcome};
use crate::engine::streams::{self, DeadLetter};

pub async fn handle(ctx: &Ctx, input: Input, entries: &[StreamEntry]) -> anyhow::Result<()> {
    let stream = input.stream(ctx).to_string();
    let names = &ctx.settings.names;
    let policy = ctx.routing.get().retry.clone();
    let mut deadletters = Vec::new();
    let mut changed = Vec::new();
    let mut freed_slot = false;
    let (mut completed, mut failed) = (0u64, 0u64);
    // (wp_id, completed?) of the reports applied, for the per-agent metrics.
    let mut reported: Vec<(String, bool)> = Vec::new();
    let mut tx = ctx.pool.begin().await?;
    for e in entries {
        let dead = |reason: &str, detail: String| DeadLetter {
            reason: reason.to_string(),
            detail,
            stream: stream.clone(),
            source_id: e.id.clone(),
            fields: e.fields.clone().unwrap_or_default(),
        };
        let Some(raw) = &e.fields else {
            deadletters.push(dead("deleted", "the entry was deleted from the stream before it was processed".into()));
            continue;
        };
        let fields = match entry::decode_fields(raw, &ctx.settings.limits) {
            Ok(f) => f,
            Err(rej) => {
                deadletters.push(dead(rej.reason, rej.detail));
                continue;
            }
        };
        let wp_id = match fields.get("wp_id") {
            Some(w) if entry::is_valid_wp_id(w) => w.clone(),
            Some(w) => {
                deadletters.push(dead("invalid", format!("wp_id {} is not a valid work package id", entry::excerpt(w))));
                continue;
            }
            None => {
                deadletters.push(dead("invalid", format!("an entry of {stream} needs a wp_id field")));
                continue;
            }
        };
        let dispatch_id = fields.get("dispatch_id").map(String::as_str).filter(|d| !d.is_empty());
        let outcome = match input {
            Input::Completed => store::complete(&mut tx, &wp_id, dispatch_id, fields.get("result").map(String::as_str)).await?,
            _ => {
                let error = fields.get("error").map(String::as_str).unwrap_or("(no error text given)");
                let retryable = !matches!(fields.get("retryable").map(String::as_str), Some("false"));
                store::fail(&mut tx, &wp_id, dispatch_id, error, retryable, &policy).await?
            }
        };
        match outcome {
            ReportOutcome::Completed => {
                completed += 1;
                freed_slot = true;
                reported.push((wp_id.clone(), true));
                tracing::info!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), "work package completed");
                changed.push(wp_id);
            }
            ReportOutcome::RetryWait { delay_ms } => {
                failed += 1;
                freed_slot = true;
                reported.push((wp_id.clone(), false));
                tracing::info!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), delay_ms, "attempt failed; will retry");
            }
            ReportOutcome::Failed => {
                failed += 1;
                freed_slot = true;
                reported.push((wp_id.clone(), false));
                tracing::warn!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), "work package failed; no attempts left");
            }
            ReportOutcome::Stale(why) => tracing::info!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), "{why}"),
            ReportOutcome::UnknownWp => deadletters.push(dead(
                "unknown_wp",
                format!("no work package {wp_id} was ever submitted; check the agent reports the wp_id of its trigger"),
            )),
        }
    }
    let unblocked = store::unblocked_by(&mut tx, &changed).await?;
    let routes = routes_of(&mut tx, &reported).await?;
    tx.commit().await?;

    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let mut redis = ctx.redis.clone();
    streams::ack_with_deadletters(&mut redis, &stream, &names.group, &ids, &deadletters, &names.deadletter, ctx.deadletter_bounds())
        .await?;
    Stats::add(&ctx.stats.completed, completed);
    Stats::add(&ctx.stats.failed, failed);
    for ((_, ok), (agent, kind)) in reported.iter().zip(&routes) {
        if *ok {
            ctx.metrics.completed(agent, kind);
        } else {
            ctx.metrics.failed(agent, kind);
        }
    }
    ctx.note_deadletters(&deadletters);

    let scope = Scope { wp_ids: unblocked, all: false, include_ready: freed_slot };
    if let Err(e) = dispatch::round(ctx, &scope).await {
        tracing::warn!(error = format!("{e:#}"), "dispatch after completions failed; the scheduler will retry");
        ctx.stats.note_error();
    }
    Ok(())
}

/// (agent, route kind) of each reported work package, in the order given.
async fn routes_of(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    reported: &[(String, bool)],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    use sqlx::Row;
    if reported.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = reported.iter().map(|(w, _)| w.clone()).collect();
    let rows =
        sqlx::query("SELECT wp_id, coalesce(agent_id, '') AS agent, coalesce(route, '') AS route FROM work_packages WHERE wp_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?;
    let mut by: std::collections::HashMap<String, (String, String)> = std::collections::HashMap::new();
    for r in rows {
        by.insert(r.try_get("wp_id")?, (r.try_get("agent")?, r.try_get("route")?));
    }
    Ok(ids.iter().map(|w| by.get(w).cloned().unwrap_or_default()).collect())
}
