//! The one loop shape every stream reader of a replica has: read, act, acknowledge, back off
//! on error. Shutdown comes through the CancellationToken and is checked between reads; a
//! read in flight is never dropped (its entries would sit in the PEL with no reader).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::core::entry::StreamEntry;
use crate::engine::backoff::Backoff;
use crate::engine::context::Ctx;
use crate::engine::input::Input;
use crate::engine::streams;
use crate::engine::{completions, ingest};

/// Processes one batch and acknowledges it. An error means nothing of the batch was
/// acknowledged; handling the same batch again is safe.
pub async fn handle_batch(ctx: &Ctx, input: Input, entries: &[StreamEntry]) -> anyhow::Result<()> {
    match input {
        Input::Incoming => ingest::handle(ctx, entries).await,
        Input::Completed | Input::Failed => completions::handle(ctx, input, entries).await,
    }
}

/// Reads one input stream until shutdown. It first drains this consumer's own pending
/// entries (a restart under the same name), then reads new ones.
pub async fn run(ctx: Arc<Ctx>, input: Input, token: CancellationToken) {
    let stream = input.stream(&ctx).to_string();
    let names = &ctx.settings.names;
    let mut conn = None;
    let mut backoff = Backoff::default();
    let mut cursor = "0";
    while !token.is_cancelled() {
        let con = match conn.as_mut() {
            Some(c) => c,
            None => match streams::blocking(&ctx.client).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::warn!(loop_name = input.loop_name(), stream = %stream, error = %e, "cannot connect to Redis; retrying");
                    ctx.stats.note_error();
                    backoff.wait(&token).await;
                    continue;
                }
            },
        };
        let block = (cursor == ">").then_some(ctx.settings.block);
        let read = streams::read_group(con, &stream, &names.group, &ctx.consumer, ctx.settings.batch_size, block, cursor).await;
        let entries = match read {
            Ok(e) => e,
            Err(e) => {
                if streams::is_nogroup(&e) {
                    // Redis lost the group (restart without persistence, or a FLUSHALL).
                    tracing::warn!(stream = %stream, "consumer group missing; recreating it");
                    ctx.group_joined.store(false, Ordering::Relaxed);
                    match streams::ensure_group(con, &stream, &names.group).await {
                        Ok(()) => ctx.group_joined.store(true, Ordering::Relaxed),
                        Err(e) => tracing::warn!(stream = %stream, error = %e, "cannot recreate the consumer group"),
                    }
                } else {
                    tracing::warn!(loop_name = input.loop_name(), stream = %stream, error = %e, "read failed; reconnecting");
                    conn = None;
                }
                ctx.stats.note_error();
                backoff.wait(&token).await;
                continue;
            }
        };
        if entries.is_empty() {
            cursor = ">";
            continue;
        }
        // The batch in hand is finished even when shutdown was asked meanwhile; only an error
        // that persists through shutdown leaves it pending, for another replica to claim.
        loop {
            match handle_batch(&ctx, input, &entries).await {
                Ok(()) => {
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    tracing::warn!(loop_name = input.loop_name(), stream = %stream, entries = entries.len(), error = format!("{e:#}"), "batch failed; retrying");
                    ctx.stats.note_error();
                    if token.is_cancelled() {
                        break;
                    }
                    backoff.wait(&token).await;
                }
            }
        }
    }
}
