//! The replica's input loops: each reads one input stream through a `streams::Reader` and
//! hands every batch to ingest or completions, which acknowledge it. A batch that fails is
//! retried until it succeeds or shutdown is asked.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::core::entry::StreamEntry;
use crate::engine::context::Ctx;
use crate::engine::input::Input;
use crate::engine::streams::{Reader, Trouble};
use crate::engine::{completions, ingest};

/// Processes one batch and acknowledges it. An error means nothing of the batch was
/// acknowledged; handling the same batch again is safe.
pub(crate) async fn handle_batch(ctx: &Ctx, input: Input, entries: &[StreamEntry]) -> anyhow::Result<()> {
    match input {
        Input::Incoming => ingest::handle(ctx, entries).await,
        Input::Completed | Input::Failed => completions::handle(ctx, input, entries).await,
    }
}

/// Reads one input stream until shutdown. It first drains this consumer's own pending
/// entries (a restart under the same name), then reads new ones.
pub async fn run(ctx: Arc<Ctx>, input: Input, token: CancellationToken) {
    let stream = input.stream(&ctx).to_string();
    let s = &ctx.settings;
    let mut reader = Reader::new(ctx.client.clone(), &stream, &s.names.group, &ctx.consumer, s.batch_size, s.block)
        .on_trouble(report_trouble(ctx.clone(), input, stream.clone()));
    while let Some(entries) = reader.next(&token).await {
        // The batch in hand is finished even when shutdown was asked meanwhile; only an error
        // that persists through shutdown leaves it pending, for another replica to claim.
        loop {
            match handle_batch(&ctx, input, &entries).await {
                Ok(()) => {
                    reader.backoff.reset();
                    break;
                }
                Err(e) => {
                    tracing::warn!(loop_name = input.loop_name(), stream = %stream, entries = entries.len(), error = format!("{e:#}"), "batch failed; retrying");
                    ctx.stats.note_error();
                    if token.is_cancelled() {
                        break;
                    }
                    reader.backoff.wait(&token).await;
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
