//! health_reporter: one `system.health` entry per interval, and a last one saying `stopping`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::engine::context::{Ctx, Stats};
use crate::engine::input::Input;
use crate::engine::streams;

/// This consumer's pending entries over the three input streams.
pub(crate) async fn own_pending(ctx: &Ctx) -> redis::RedisResult<u64> {
    let mut redis = ctx.redis.clone();
    let mut total = 0;
    for input in Input::ALL {
        let summary = streams::pending_summary(&mut redis, input.stream(ctx), &ctx.settings.names.group).await?;
        total += summary.consumers.iter().filter(|(c, _)| *c == ctx.consumer).map(|(_, n)| n).sum::<u64>();
    }
    Ok(total)
}

pub async fn report(ctx: &Ctx, status: &str) -> redis::RedisResult<String> {
    let pending = own_pending(ctx).await.map(|n| n.to_string()).unwrap_or_else(|_| "unknown".into());
    let s = &ctx.stats;
    let fields = [
        ("component", "ge-orchestrator".to_string()),
        ("instance", ctx.consumer.clone()),
        ("status", status.to_string()),
        ("ts", chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("config_version", ctx.routing.get().config_version.clone()),
        ("routed", Stats::get(&s.routed).to_string()),
        ("completed", Stats::get(&s.completed).to_string()),
        ("failed", Stats::get(&s.failed).to_string()),
        ("deadlettered", Stats::get(&s.deadlettered).to_string()),
        ("reload_failures", Stats::get(&s.reload_failures).to_string()),
        ("pending", pending),
        ("retention", ctx.settings.retention.retention.to_string()),
        ("trigger_retention", ctx.settings.retention.describe_triggers()),
    ];
    let mut redis = ctx.redis.clone();
    streams::xadd(&mut redis, &ctx.settings.names.health, Some(ctx.settings.health_maxlen), &fields).await
}

/// `degraded` while standing down (`duty`) or when a loop reported an error within the last
/// two intervals.
fn current_status(ctx: &Ctx) -> &'static str {
    if ctx.duty.standing_down().is_some() {
        return "degraded";
    }
    let last = Stats::get(&ctx.stats.last_error_at);
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    if last > 0 && now.saturating_sub(last) < 2 * ctx.settings.health_interval.as_secs().max(1) { "degraded" } else { "ok" }
}

pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.settings.health_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        if let Err(e) = report(&ctx, current_status(&ctx)).await {
            tracing::warn!(error = %e, "cannot write the health entry");
            ctx.stats.note_error();
        }
    }
}
