//! postgres_probe: decides whether this replica is on duty (`duty`). PostgreSQL is probed on a
//! connection of its own every `lease_refresh`: what is measured is the link, not the engine's
//! pool, which may be busy with slow statements (a takeover behind a lock) without anything
//! being wrong with this replica.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::engine::context::Ctx;
use crate::engine::{store, takeover};

/// Probes PostgreSQL every `lease_refresh` until shutdown; stands the replica down once no
/// probe has succeeded for `postgres_lost_after`, and puts it back on duty (its lease taken
/// first) at the first probe that succeeds.
pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    let s = &ctx.settings;
    let lost_after = s.postgres_lost_after;
    let probe = match store::session_options(&s.conn.database_url, "ge-orchestrator-probe", Some(lost_after)) {
        Ok(options) => sqlx::postgres::PgPoolOptions::new().max_connections(1).acquire_timeout(lost_after).connect_lazy_with(options),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cannot probe PostgreSQL; this replica will not stand down when it loses it");
            return;
        }
    };
    let mut tick = tokio::time::interval(s.lease_refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_answer = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => break,
        }
        let answered = tokio::select! {
            r = tokio::time::timeout(lost_after, sqlx::query("SELECT 1").execute(&probe)) => match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {}", humantime::format_duration(lost_after))),
            },
            _ = token.cancelled() => break,
        };
        match (answered, ctx.duty.standing_down()) {
            (Ok(()), None) => last_answer = Instant::now(),
            (Ok(()), Some(_)) => {
                last_answer = Instant::now();
                // The lease first: a replica reading without one would be taken over at once.
                if let Err(e) = takeover::acquire(&ctx).await {
                    tracing::warn!(error = %e, "cannot take the lease back; resuming all the same");
                }
                ctx.duty.resume();
                tracing::info!(consumer = %ctx.consumer, "PostgreSQL answers again; back on duty");
            }
            (Err(e), None) if last_answer.elapsed() >= lost_after => {
                let reason = format!(
                    "PostgreSQL has not answered for {:.1} s ({e}): standing down, this replica's entries are handed over",
                    last_answer.elapsed().as_secs_f64()
                );
                tracing::warn!(consumer = %ctx.consumer, reason = %reason, "standing down");
                ctx.duty.stand_down(reason);
                ctx.stats.note_error();
            }
            (Err(e), _) => {
                tracing::debug!(error = %e, "PostgreSQL probe failed");
                ctx.stats.note_error();
            }
        }
    }
    probe.close().await;
}
