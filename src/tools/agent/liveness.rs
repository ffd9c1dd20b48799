//! What an agent does while its command runs, besides waiting for it.

use std::convert::Infallible;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::engine::streams;

/// Claims the trigger `id` again every `every` (none: never) for as long as it is polled, so
/// that another instance of the agent does not take it over as abandoned while the command
/// runs, however long. Never ends: it is dropped when the command ends.
pub(super) async fn keep_claimed(
    mut con: ConnectionManager,
    stream: &str,
    group: &str,
    consumer: &str,
    id: &str,
    every: Option<Duration>,
) -> Infallible {
    let Some(every) = every else { return std::future::pending().await };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match streams::keep_claimed(&mut con, stream, group, consumer, id).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(id, "the trigger was taken over by another consumer; it may run twice");
                return std::future::pending().await;
            }
            Err(e) => tracing::warn!(error = %e, id, "cannot keep the trigger claimed"),
        }
    }
}
