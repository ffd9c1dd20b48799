//! The scheduler: every interval, publish claims left unconfirmed, expire dispatches past
//! their deadline, and dispatch what became possible without an event this replica saw (retry
//! timers that came due, slots freed, lane gates opened by another replica, operators' retries
//! and cancels).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::engine::context::Ctx;
use crate::engine::deadlines;
use crate::engine::dispatch;
use crate::engine::statistics;
use crate::engine::waits;

pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.settings.scheduler_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        if let Err(e) = dispatch::republish_stale(&ctx).await {
            tracing::warn!(error = format!("{e:#}"), "republishing unconfirmed dispatches failed");
            ctx.stats.note_error();
        }
        if let Err(e) = dispatch::fold_in_flight(&ctx).await {
            tracing::warn!(error = %e, "folding the in-flight counts failed");
            ctx.stats.note_error();
        }
        if let Err(e) = deadlines::expire_overdue(&ctx).await {
            tracing::warn!(error = format!("{e:#}"), "expiring overdue dispatches failed");
            ctx.stats.note_error();
        }
        if let Err(e) = waits::sweep(&ctx).await {
            tracing::warn!(error = format!("{e:#}"), "ending timed-out waits failed");
            ctx.stats.note_error();
        }
        if let Err(e) = statistics::keep_up(&ctx).await {
            tracing::warn!(error = %e, "analyzing work_packages failed");
            ctx.stats.note_error();
        }
        if let Err(e) = dispatch::reroute_open_work(&ctx).await {
            tracing::warn!(error = format!("{e:#}"), "routing open work again failed");
            ctx.stats.note_error();
        }
        if let Err(e) = dispatch::sweep(&ctx).await {
            tracing::warn!(error = format!("{e:#}"), "scheduled dispatch round failed");
            ctx.stats.note_error();
        }
    }
}
