//! Fast takeover. Every replica keeps a lease, a key with a short TTL that it refreshes
//! often. A consumer of the group that holds pending entries but has no live lease is dead
//! (or paused past its lease): a survivor claims its entries at once, processes them like
//! fresh ones, and removes it from the group so consumers do not pile up across restarts.
//! The XAUTOCLAIM sweep in `recover` stays as the backstop.
//!
//! Claiming from a replica that is only paused is safe: everything downstream is idempotent
//! (ingest by wp_id and fields, completion by dispatch_id, publication by the NX key).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::engine::consume;
use crate::engine::context::Ctx;
use crate::engine::input::Input;
use crate::{engine::recover, engine::streams};

pub(crate) fn lease_key(ctx: &Ctx, consumer: &str) -> String {
    format!("{}{}:{}", ctx.settings.lease_prefix, ctx.settings.names.group, consumer)
}

async fn refresh(ctx: &Ctx) -> redis::RedisResult<()> {
    let mut redis = ctx.redis.clone();
    streams::set_expiring(&mut redis, &lease_key(ctx, &ctx.consumer), &chrono::Utc::now().to_rfc3339(), ctx.settings.lease_ttl).await
}

pub(crate) async fn release(ctx: &Ctx) {
    let mut redis = ctx.redis.clone();
    let _ = streams::delete_key(&mut redis, &lease_key(ctx, &ctx.consumer)).await;
}

/// Removes `consumer` from the group on every input stream, so consumers do not pile up
/// across restarts. Returns what failed.
pub(crate) async fn remove_consumer(ctx: &Ctx, consumer: &str) -> Vec<redis::RedisError> {
    let mut redis = ctx.redis.clone();
    let mut failed = Vec::new();
    for input in Input::ALL {
        if let Err(e) = streams::remove_consumer(&mut redis, input.stream(ctx), &ctx.settings.names.group, consumer).await {
            failed.push(e);
        }
    }
    failed
}

/// Claims and processes every pending entry of `dead` on `input`'s stream.
async fn take_over(ctx: &Ctx, input: Input, dead: &str) -> anyhow::Result<usize> {
    let stream = input.stream(ctx).to_string();
    let group = &ctx.settings.names.group;
    let mut redis = ctx.redis.clone();
    let mut taken = 0;
    loop {
        let ids: Vec<String> = streams::delivery_counts(&mut redis, &stream, group, "-", "+", ctx.settings.batch_size, dead)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return Ok(taken);
        }
        let mut entries = streams::claim(&mut redis, &stream, group, &ctx.consumer, &ids).await?;
        // An id that comes back as nothing was either deleted from the stream or acknowledged
        // meanwhile (by `dead` itself, resuming from a pause). Only the first is a loss to record.
        let claimed: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let missing: Vec<String> = ids.iter().filter(|id| !claimed.contains(id.as_str())).cloned().collect();
        let mut deleted = Vec::new();
        for id in missing {
            if streams::range(&mut redis, &stream, &id, &id).await?.is_empty() {
                deleted.push(id);
            }
        }
        if !deleted.is_empty() {
            recover::ack_deleted(ctx, &stream, &deleted).await?;
        }
        taken += entries.len();
        entries = recover::split_poison(ctx, &stream, entries).await?;
        if !entries.is_empty() {
            consume::handle_batch(ctx, input, &entries).await?;
        }
    }
}

/// One pass: find consumers without a lease, take over their entries, remove them.
pub async fn sweep(ctx: &Ctx, started: &mut std::collections::HashMap<String, Instant>) -> anyhow::Result<Vec<String>> {
    let mut redis = ctx.redis.clone();
    let mut removed = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for input in Input::ALL {
        for (name, _) in streams::group_consumers(&mut redis, input.stream(ctx), &ctx.settings.names.group).await? {
            seen.insert(name);
        }
    }
    seen.remove(&ctx.consumer);
    for name in seen {
        if streams::key_exists(&mut redis, &lease_key(ctx, &name)).await? {
            started.remove(&name);
            continue;
        }
        let since = *started.entry(name.clone()).or_insert_with(Instant::now);
        let mut taken = 0;
        for input in Input::ALL {
            taken += take_over(ctx, input, &name).await?;
        }
        if taken > 0 {
            tracing::warn!(consumer = %name, entries = taken, took_ms = since.elapsed().as_millis() as u64, "took over the pending entries of a consumer whose lease lapsed");
        }
        // A consumer that took its lease back meanwhile (a replica back on duty, or back from a
        // pause) reads again, and removing it could drop what it has just read: leave it.
        if streams::key_exists(&mut redis, &lease_key(ctx, &name)).await? {
            started.remove(&name);
            continue;
        }
        // A consumer that is only paused re-creates itself on its next read.
        remove_consumer(ctx, &name).await;
        started.remove(&name);
        removed.push(name);
    }
    Ok(removed)
}

/// Ticks every `lease_refresh`; a step that overruns delays the next tick rather than
/// bunching them up.
struct Ticker(tokio::time::Interval);

impl Ticker {
    fn new(ctx: &Ctx) -> Ticker {
        let mut tick = tokio::time::interval(ctx.settings.lease_refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker(tick)
    }

    /// False once shutdown is asked.
    async fn next(&mut self, token: &CancellationToken) -> bool {
        tokio::select! {
            _ = self.0.tick() => true,
            _ = token.cancelled() => false,
        }
    }
}

/// Refreshes this replica's lease every `lease_refresh`. It is a task of its own: a takeover
/// can take as long as the dead consumer's backlog and PostgreSQL make it, and a refresh
/// waiting behind it would let this replica's lease lapse, so that it is taken over in turn.
/// While the replica stands down (`duty`) the lease is not refreshed, and is given up as soon
/// as no loop reads or handles entries, so that survivors take this replica over at their next
/// check instead of after the lease's TTL; `duty` takes it back before the loops read again.
pub async fn refresh_lease(ctx: Arc<Ctx>, token: CancellationToken) {
    let mut ticker = Ticker::new(&ctx);
    let mut released = false;
    while ticker.next(&token).await {
        if ctx.duty.standing_down().is_some() {
            if !released && ctx.duty.idle() {
                release(&ctx).await;
                released = true;
                tracing::warn!(consumer = %ctx.consumer, "lease given up while standing down; other replicas take over this one's entries");
            }
            continue;
        }
        released = false;
        if let Err(e) = refresh(&ctx).await {
            tracing::warn!(error = %e, "cannot refresh the lease");
            ctx.stats.note_error();
        }
    }
}

/// Looks for consumers without a lease every `lease_refresh` and takes them over; not while
/// this replica stands down, since it could not handle what it claimed.
pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    let mut ticker = Ticker::new(&ctx);
    let mut started = std::collections::HashMap::new();
    while ticker.next(&token).await {
        match ctx.duty.while_on_duty(sweep(&ctx, &mut started)).await {
            None | Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = format!("{e:#}"), "takeover sweep failed");
                ctx.stats.note_error();
            }
        }
    }
}

/// Sets the lease once before the loops start reading, so no survivor mistakes a starting
/// replica for a dead one.
pub(crate) async fn acquire(ctx: &Ctx) -> redis::RedisResult<()> {
    refresh(ctx).await
}
