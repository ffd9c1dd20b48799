//! What an agent does while its command runs, besides waiting for it: telling the
//! orchestrator that the dispatch is alive, and the other instances that its trigger is taken.

use std::convert::Infallible;
use std::time::Duration;

use crate::engine::streams::MasterConnection;

use crate::engine::streams;

/// Claims the trigger `id` again every `every` (none: never) for as long as it is polled, so
/// that another instance of the agent does not take it over as abandoned while the command
/// runs, however long. Never ends: it is dropped when the command ends.
pub(super) async fn keep_claimed(
    mut con: MasterConnection,
    stream: &str,
    group: &str,
    consumer: &str,
    id: &str,
    every: Option<Duration>,
) -> Infallible {
    let Some(mut ticks) = every.map(ticks) else { return std::future::pending().await };
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

/// XADDs a heartbeat (contract v1.1) every `every` (none: never) for as long as it is
/// polled: the orchestrator extends the dispatch's deadline on each. Never ends: it is
/// dropped when the command ends, and so are the heartbeats.
pub(super) async fn heartbeats(mut con: MasterConnection, stream: &str, beat: &[(&str, &str)], every: Option<Duration>) -> Infallible {
    let Some(mut ticks) = every.map(ticks) else { return std::future::pending().await };
    loop {
        ticks.tick().await;
        if let Err(e) = streams::xadd(&mut con, stream, None, beat).await {
            tracing::warn!(error = %e, "cannot send a heartbeat");
        }
    }
}

/// A tick every `every`, the first one `every` from now; late ticks are not made up for.
fn ticks(every: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}
