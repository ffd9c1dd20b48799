//! The replica's input loops: each reads one input stream through a `streams::Reader` and
//! hands every batch to ingest or completions, which acknowledge it. A batch that fails is
//! retried until it succeeds or shutdown is asked; while the replica stands down (`duty`:
//! PostgreSQL lost) nothing is read and the batch in hand is left for another replica.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::core::entry::StreamEntry;
use crate::engine::context::Ctx;
use crate::engine::input::Input;
use crate::engine::streams::{DeadLetter, Reader, Trouble};
use crate::engine::{completions, deadlines, ingest, waits};

/// Processes one batch and acknowledges it. An error means some of the batch may not have
/// been acknowledged; handling the same batch again is safe, since every step is idempotent.
///
/// A batch that PostgreSQL refuses because of what one entry holds (not a lost connection or a
/// timeout) is split in halves until the entry at fault stands alone; that entry alone is
/// dead-lettered as `invalid` with the database's message, and the rest go through. Without
/// this, one such entry would make its batch fail forever and stop the loop.
pub(crate) async fn handle_batch(ctx: &Ctx, input: Input, entries: &[StreamEntry]) -> anyhow::Result<()> {
    let result = match input {
        Input::Incoming => ingest::handle(ctx, entries).await,
        Input::Completed | Input::Failed => completions::handle(ctx, input, entries).await,
        Input::Heartbeat => deadlines::handle_heartbeats(ctx, entries).await,
        Input::Events => waits::handle_events(ctx, entries).await,
    };
    let Err(e) = result else { return Ok(()) };
    let Some(refused) = data_error(&e) else { return Err(e) };
    if let [entry] = entries {
        return dead_letter_refused(ctx, input, entry, &refused).await;
    }
    tracing::info!(stream = %input.stream(ctx), entries = entries.len(), error = %refused, "PostgreSQL refused a batch for its data; splitting it");
    let (left, right) = entries.split_at(entries.len() / 2);
    Box::pin(handle_batch(ctx, input, left)).await?;
    Box::pin(handle_batch(ctx, input, right)).await
}

/// The database's message when `e` is PostgreSQL refusing the data itself: a data exception
/// (class 22, e.g. a NUL byte in text), an integrity violation (23) or a program limit such as
/// an index row too large (54). Anything else (connections, timeouts, deadlocks) is transient.
fn data_error(e: &anyhow::Error) -> Option<String> {
    e.chain().find_map(|cause| match cause.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) if db.code().is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.starts_with(class))) => {
            Some(format!("{} (SQLSTATE {})", db.message(), db.code().unwrap_or_default()))
        }
        Some(sqlx::Error::Encode(err)) => Some(format!("cannot encode a value: {err}")),
        _ => None,
    })
}

async fn dead_letter_refused(ctx: &Ctx, input: Input, entry: &StreamEntry, refused: &str) -> anyhow::Result<()> {
    let stream = input.stream(ctx);
    let dls = [DeadLetter::of(
        stream,
        entry,
        "invalid",
        format!("PostgreSQL refused to store this entry: {refused}; fix the entry and requeue it"),
    )];
    ctx.ack(stream, std::slice::from_ref(&entry.id), &dls).await?;
    Ok(())
}

/// Reads one input stream until shutdown. It first drains this consumer's own pending
/// entries (a restart under the same name), then reads new ones. While the replica stands down
/// (`duty`) it reads nothing, and what it was reading or handling is left pending for the
/// takeover of another replica.
pub async fn run(ctx: Arc<Ctx>, input: Input, token: CancellationToken) {
    let stream = input.stream(&ctx).to_string();
    let s = &ctx.settings;
    // Own pending entries first after a failed read: a Redis failover can lose acknowledgements
    // the old master had not yet replicated, which puts entries already handled back into this
    // consumer's pending list, where they would hold back their lanes until the sweep.
    let mut reader = Reader::new(ctx.endpoint.clone(), &stream, &s.names.group, &ctx.consumer, s.batch_size, s.block)
        .own_first_after_reconnect()
        .on_trouble(report_trouble(ctx.clone(), input, stream.clone()));
    while let Some(period) = ctx.duty.on_duty(&token).await {
        let _busy = ctx.duty.busy();
        while let Some(entries) = reader.next_unless(&token, &period).await {
            if !finish(&ctx, input, &entries, &mut reader, &token, &period).await {
                break;
            }
        }
        // Stood down: what was given up is read again first when back on duty, unless another
        // replica took it over meanwhile (with none, nobody else would before the sweep).
        reader.abandon();
    }
}

/// Handles a batch until it succeeds. The batch in hand is finished even when shutdown was
/// asked meanwhile; only an error that persists through shutdown leaves it pending, for
/// another replica to claim, or the replica standing down (`period` cancelled), which gives
/// it up at once, in the middle of an attempt if need be: each step is idempotent, so the
/// replica that takes it over may do again what this one did. False when left pending.
async fn finish(
    ctx: &Ctx,
    input: Input,
    entries: &[StreamEntry],
    reader: &mut Reader,
    token: &CancellationToken,
    period: &CancellationToken,
) -> bool {
    loop {
        let attempt = tokio::select! {
            biased;
            _ = period.cancelled() => None,
            r = handle_batch(ctx, input, entries) => Some(r),
        };
        match attempt {
            Some(Ok(())) => {
                reader.backoff.reset();
                return true;
            }
            None => {
                tracing::warn!(stream = %input.stream(ctx), entries = entries.len(), "standing down: the batch in hand is left pending for another replica");
                return false;
            }
            Some(Err(e)) => {
                tracing::warn!(loop_name = input.loop_name(), stream = %input.stream(ctx), entries = entries.len(), error = format!("{e:#}"), "batch failed; retrying");
                ctx.stats.note_error();
                if token.is_cancelled() {
                    return false;
                }
                tokio::select! {
                    _ = reader.backoff.wait(token) => {}
                    _ = period.cancelled() => {}
                }
            }
        }
    }
}

/// Logs and counts what the reader ran into; `/readyz` says "not joined" while the group is
/// being recreated.
fn report_trouble(ctx: Arc<Ctx>, input: Input, stream: String) -> impl Fn(Trouble<'_>) + Send + Sync + 'static {
    move |trouble| match trouble {
        Trouble::Connect(e) => {
            tracing::warn!(loop_name = input.loop_name(), stream = %stream, error = %e, "cannot connect to Redis; retrying");
            ctx.stats.note_error();
        }
        Trouble::GroupMissing(_) => {
            tracing::warn!(stream = %stream, "consumer group missing; recreating it");
            ctx.group_joined.store(false, Ordering::Relaxed);
        }
        Trouble::GroupRecreated(made) => {
            match made {
                Ok(()) => ctx.group_joined.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(stream = %stream, error = %e, "cannot recreate the consumer group"),
            }
            ctx.stats.note_error();
        }
        Trouble::Read(e) => {
            tracing::warn!(loop_name = input.loop_name(), stream = %stream, error = %e, "read failed; reconnecting");
            ctx.stats.note_error();
        }
    }
}
