//! process_completions: apply `ge:work:completed` and `ge:work:failed` reports, then dispatch
//! what they unblock (dependents, the lane's next work package, work waiting for a slot).

use crate::consumer::Input;
use crate::context::{Ctx, Stats};
use crate::dispatch::{self, Scope};
use crate::entry::{self, StreamEntry};
use crate::store::{self, ReportOutcome};
use crate::streams::{self, DeadLetter};

pub async fn handle(ctx: &Ctx, input: Input, entries: &[StreamEntry]) -> anyhow::Result<()> {
    let stream = input.stream(ctx).to_string();
    let names = &ctx.settings.names;
    let policy = ctx.routing.get().retry.clone();
    let mut deadletters = Vec::new();
    let mut changed = Vec::new();
    let mut freed_slot = false;
    let (mut completed, mut failed) = (0u64, 0u64);
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
                changed.push(wp_id);
            }
            ReportOutcome::RetryWait { delay_ms } => {
                failed += 1;
                freed_slot = true;
                tracing::info!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), delay_ms, "attempt failed; will retry");
            }
            ReportOutcome::Failed => {
                failed += 1;
                freed_slot = true;
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
    tx.commit().await?;

    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let mut redis = ctx.redis.clone();
    streams::ack_with_deadletters(&mut redis, &stream, &names.group, &ids, &deadletters, &names.deadletter, ctx.settings.deadletter_maxlen)
        .await?;
    Stats::add(&ctx.stats.completed, completed);
    Stats::add(&ctx.stats.failed, failed);
    Stats::add(&ctx.stats.deadlettered, deadletters.len() as u64);

    let scope = Scope { wp_ids: unblocked, all: false, include_ready: freed_slot };
    if let Err(e) = dispatch::round(ctx, &scope).await {
        tracing::warn!(error = format!("{e:#}"), "dispatch after completions failed; the scheduler will retry");
        ctx.stats.note_error();
    }
    Ok(())
}
