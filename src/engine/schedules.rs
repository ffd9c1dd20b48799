//! Schedules (contract v1.6): every replica's loop that fires them. A round
//! 1. locks the schedules whose next firing has come (`FOR UPDATE SKIP LOCKED`: a schedule
//!    another replica is deciding is left to it, and no replica waits on another), decides
//!    which firings to submit (`core::schedule::due`: the missed-firing policy), applies the
//!    overlap policy, records each firing with its entries and moves the schedule's next
//!    firing past now, all in one transaction: each firing is decided once, by one replica;
//! 2. publishes the recorded firings whose entries Redis has not confirmed, in one pipeline
//!    each, then marks them published. Its own at once; another replica's once it has been
//!    left for `--republish-after` (that replica died between decision and publication).
//!    Publishing a firing twice sends the same wp_ids with the same fields, which ingest takes
//!    as a no-op, so no firing is lost and none is submitted twice under different ids.
//!
//! A replica that stands down (PostgreSQL lost) decides and publishes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::core::schedule::{self, Missed, Overlap, Timing};
use crate::engine::backoff::Backoff;
use crate::engine::context::Ctx;
use crate::engine::schedule_store::{self as store, DueSchedule};
use crate::engine::streams;

/// How often a replica looks for due schedules: a firing is decided within this of its time
/// (one indexed query a round, on the database's clock).
const TICK: Duration = Duration::from_millis(250);
/// Schedules decided, and firings published, per transaction.
const BATCH: i64 = 20;
/// How often finished firings beyond each schedule's newest are removed.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::default();
    let mut pruned = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        if ctx.duty.on_duty(&token).await.is_none() {
            return;
        }
        let prune = pruned.elapsed() >= PRUNE_EVERY;
        match ctx.duty.while_on_duty(round(&ctx, prune)).await {
            None => {}
            Some(Ok(())) => {
                backoff.reset();
                if prune {
                    pruned = Instant::now();
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = format!("{e:#}"), "firing schedules failed; retrying");
                ctx.stats.note_error();
                backoff.wait(&token).await;
            }
        }
    }
}

async fn round(ctx: &Ctx, prune: bool) -> anyhow::Result<()> {
    while decide(ctx).await? == BATCH as usize {}
    while publish(ctx).await? == BATCH as usize {}
    if prune {
        store::prune(&ctx.pool).await?;
    }
    Ok(())
}

/// What one decision recorded, counted once its transaction commits.
#[derive(Default)]
struct Counts(Vec<(String, &'static str, u64)>);

/// Decides the due schedules of one batch; returns how many there were.
async fn decide(ctx: &Ctx) -> anyhow::Result<usize> {
    let mut tx = ctx.pool.begin().await?;
    let due = store::lock_due(&mut tx, BATCH).await?;
    let mut counts = Counts::default();
    for s in &due {
        decide_one(ctx, &mut tx, s, &mut counts).await?;
    }
    tx.commit().await?;
    for (name, outcome, n) in counts.0 {
        ctx.metrics.schedule_firings(&name, outcome, n);
    }
    Ok(due.len())
}

async fn decide_one(ctx: &Ctx, tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, s: &DueSchedule, counts: &mut Counts) -> anyhow::Result<()> {
    // Stored definitions were checked when they were added; one this build cannot read (a
    // time zone gone from its database, say) is not fired, and is tried again in a minute.
    let policies = Timing::parse(&s.cron, &s.timezone).map_err(|e| e.to_string()).and_then(|t| {
        Ok((t, s.missed.parse::<Missed>().map_err(|e| e.to_string())?, s.overlap.parse::<Overlap>().map_err(|e| e.to_string())?))
    });
    let (timing, missed, overlap) = match policies {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(schedule = %s.name, error = %e, "cannot read a stored schedule; not firing it");
            store::set_next(tx, &s.name, Some(s.now + chrono::TimeDelta::minutes(1))).await?;
            return Ok(());
        }
    };
    let due = schedule::due(&timing, missed, s.next_fire_at, s.now);
    for fire_at in &due.fire {
        let prefix = schedule::prefix(&s.name, *fire_at);
        let outcome = if overlap == Overlap::Skip && store::previous_open(tx, &s.name).await? { "skipped_overlap" } else { "submitted" };
        let (wp_ids, entries) = match (outcome, s.entries(&prefix, *fire_at)) {
            ("submitted", Ok(e)) => e,
            ("submitted", Err(e)) => {
                tracing::error!(schedule = %s.name, error = %e, "cannot read a stored schedule's plan; not firing it");
                continue;
            }
            _ => (Vec::new(), Vec::new()),
        };
        if store::record_firing(tx, &s.name, *fire_at, outcome, &prefix, &wp_ids, &entries, &ctx.consumer).await? {
            tracing::info!(schedule = %s.name, fire_at = %fire_at.to_rfc3339(), outcome, prefix = %prefix, "schedule fired");
            counts.0.push((s.name.clone(), outcome, 1));
        }
    }
    if due.missed > 0 {
        tracing::warn!(schedule = %s.name, missed = due.missed, policy = %missed, "firings missed while no replica ran them; skipped");
        counts.0.push((s.name.clone(), "missed", due.missed));
    }
    store::set_next(tx, &s.name, due.next).await?;
    Ok(())
}

/// Publishes one batch of unpublished firings; returns how many there were.
async fn publish(ctx: &Ctx) -> anyhow::Result<usize> {
    let mut tx = ctx.pool.begin().await?;
    let firings = store::lock_unpublished(&mut tx, &ctx.consumer, ctx.settings.republish_after, BATCH).await?;
    let mut redis = ctx.redis.clone();
    for f in &firings {
        streams::xadd_many_confirmed(&mut redis, &ctx.settings.names.incoming, &f.entries).await?;
        store::mark_published(&mut tx, &f.schedule, f.fire_at).await?;
    }
    tx.commit().await?;
    Ok(firings.len())
}
