//! recover_pending: the backstop that takes over entries left pending by a consumer that
//! died. Claims with XAUTOCLAIM until the cursor returns to 0-0, acknowledges ids deleted
//! from the stream, dead-letters poison entries, and processes the rest like fresh ones.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::core::entry::StreamEntry;
use crate::engine::consume;
use crate::engine::context::Ctx;
use crate::engine::input::Input;
use crate::engine::streams::{self, DeadLetter};

/// One full sweep of every input stream. Returns how many entries were taken over.
pub async fn sweep(ctx: &Ctx, min_idle: std::time::Duration) -> anyhow::Result<usize> {
    let names = &ctx.settings.names;
    let mut redis = ctx.redis.clone();
    let mut taken = 0;
    for input in Input::ALL {
        let stream = input.stream(ctx).to_string();
        let mut cursor = "0-0".to_string();
        loop {
            let (next, entries, deleted) =
                streams::autoclaim(&mut redis, &stream, &names.group, &ctx.consumer, min_idle, &cursor, ctx.settings.batch_size).await?;
            if !deleted.is_empty() {
                ack_deleted(ctx, &stream, &deleted).await?;
            }
            if !entries.is_empty() {
                taken += entries.len();
                let live = split_poison(ctx, &stream, entries).await?;
                if !live.is_empty() {
                    consume::handle_batch(ctx, input, &live).await?;
                }
            }
            if next == "0-0" {
                break;
            }
            cursor = next;
        }
    }
    Ok(taken)
}

/// Acknowledges pending ids whose entries were deleted from the stream, recording each as a
/// `deleted` dead letter so the loss is visible.
pub(crate) async fn ack_deleted(ctx: &Ctx, stream: &str, deleted: &[String]) -> anyhow::Result<()> {
    tracing::warn!(stream = %stream, ids = ?deleted, "pending entries were deleted from the stream; acknowledging them");
    let dls: Vec<DeadLetter> = deleted
        .iter()
        .map(|id| DeadLetter {
            reason: "deleted".into(),
            detail: "the entry was deleted from the stream while it was pending; its content is lost".into(),
            stream: stream.to_string(),
            source_id: id.clone(),
            fields: Vec::new(),
        })
        .collect();
    ctx.ack(stream, deleted, &dls).await?;
    Ok(())
}

/// Dead-letters (and acknowledges) the claimed entries delivered more than `max_deliveries`
/// times; returns the others.
pub(crate) async fn split_poison(ctx: &Ctx, stream: &str, entries: Vec<StreamEntry>) -> anyhow::Result<Vec<StreamEntry>> {
    let names = &ctx.settings.names;
    let mut redis = ctx.redis.clone();
    let (first, last) = match (entries.first(), entries.last()) {
        (Some(f), Some(l)) => (f.id.clone(), l.id.clone()),
        _ => return Ok(entries),
    };
    let counts = streams::delivery_counts(&mut redis, stream, &names.group, &first, &last, entries.len() * 2 + 10, &ctx.consumer).await?;
    let mut live = Vec::new();
    let mut poison = Vec::new();
    for e in entries {
        let n = counts.iter().find(|(id, _)| *id == e.id).map(|(_, n)| *n).unwrap_or(0);
        if n > ctx.settings.max_deliveries {
            let detail = format!(
                "delivered {n} times (more than max_deliveries = {}) without being acknowledged; inspect it before requeueing",
                ctx.settings.max_deliveries
            );
            poison.push(DeadLetter::of(stream, &e, "poison", detail));
        } else {
            live.push(e);
        }
    }
    if !poison.is_empty() {
        let ids: Vec<String> = poison.iter().map(|p| p.source_id.clone()).collect();
        ctx.ack(stream, &ids, &poison).await?;
    }
    Ok(live)
}

pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.settings.recover_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        // Not while standing down: what it claimed, this replica could not handle.
        match ctx.duty.while_on_duty(sweep(&ctx, ctx.settings.claim_min_idle)).await {
            None | Some(Ok(0)) => {}
            Some(Ok(n)) => tracing::info!(entries = n, "took over pending entries"),
            Some(Err(e)) => {
                tracing::warn!(error = format!("{e:#}"), "pending-entry sweep failed");
                ctx.stats.note_error();
            }
        }
    }
}
