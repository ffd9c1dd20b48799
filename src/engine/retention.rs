//! Retention (contract v1.3): the loop that keeps a replica running for months. Every
//! `GE_RETENTION_INTERVAL` it removes finished work packages older than `GE_RETENTION` from
//! PostgreSQL, then trims the streams (`trimming`). Each part runs on one replica at a time,
//! and a replica that finds the other busy skips its turn instead of waiting.
//!
//! A work package is removed, with its edges, its history and any outbox row, once it has
//! been finished (completed, failed, cancelled) for the retention period, unless something
//! still needs it:
//! - a dependent that is not completed still reads its status: one that waits or runs, and one
//!   that failed or was cancelled, which an operator may retry. Without the row it would wait
//!   for ever on a dependency "not submitted yet". So a prerequisite stays as long as any such
//!   dependent does (the dependent itself goes after its own retention, then the prerequisite);
//! - a failed lane member is an unresolved failure, and holds its lane until an operator
//!   retries, cancels or skips it: it is never removed, with work behind it or not yet (a
//!   member sent later would otherwise run past it).
//!
//! Batches are small transactions that lock the rows they remove with `SKIP LOCKED`; the
//! engine never updates a finished row except for an operator's retry, and no statement of
//! the engine waits on one for longer than a batch.

use std::sync::Arc;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::engine::backoff::Backoff;
use crate::engine::context::Ctx;
use crate::engine::trimming;

/// Namespace of the retention lock (`pg_try_advisory_xact_lock(RETENTION_LOCK, 0)`).
const RETENTION_LOCK: i32 = 0x6766;
/// At most this many batches a turn, so a replica that starts on a long history also comes
/// back to the streams.
const MAX_BATCHES: usize = 200;

/// Rows removed by one batch.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Removed {
    pub work_packages: u64,
    pub events: u64,
    pub edges: u64,
}

/// One batch: up to `limit` work packages finished before `now - period`, with what hangs on
/// them (its edges go by the foreign key's cascade). `None` when another replica holds the retention lock.
pub(crate) async fn remove_batch(ctx: &Ctx, period: std::time::Duration, limit: i64) -> Result<Option<Removed>, sqlx::Error> {
    let mut tx = ctx.pool.begin().await?;
    let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, 0)").bind(RETENTION_LOCK).fetch_one(&mut *tx).await?;
    if !mine {
        tx.rollback().await?;
        return Ok(None);
    }
    let row = sqlx::query(
        "WITH doomed AS MATERIALIZED (
             SELECT w.wp_id FROM work_packages w
             WHERE w.status IN ('completed', 'failed', 'cancelled')
               AND w.updated_at < now() - make_interval(secs => $1::float8)
               AND NOT EXISTS (SELECT 1 FROM work_package_deps d JOIN work_packages o ON o.wp_id = d.wp_id
                               WHERE d.depends_on = w.wp_id AND o.status <> 'completed')
               AND NOT (w.status = 'failed' AND w.lane IS NOT NULL)
             ORDER BY w.updated_at
             LIMIT $2
             FOR UPDATE OF w SKIP LOCKED),
         events AS (DELETE FROM work_package_events e USING doomed d WHERE e.wp_id = d.wp_id RETURNING 1),
         outbox AS (DELETE FROM dispatch_outbox o USING doomed d WHERE o.wp_id = d.wp_id RETURNING 1),
         usage AS (DELETE FROM dispatch_usage u USING doomed d WHERE u.wp_id = d.wp_id RETURNING 1),
         edges AS (SELECT count(*) AS n FROM work_package_deps p JOIN doomed d ON p.wp_id = d.wp_id),
         gone AS (DELETE FROM work_packages w USING doomed d WHERE w.wp_id = d.wp_id RETURNING 1)
         SELECT (SELECT count(*) FROM gone) AS wps, (SELECT count(*) FROM events) AS events,
                (SELECT n FROM edges) AS edges, (SELECT count(*) FROM outbox) AS outbox",
    )
    .bind(period.as_secs_f64())
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let n = |c: &str| row.try_get::<i64, _>(c).map(|v| v.max(0) as u64);
    Ok(Some(Removed { work_packages: n("wps")?, events: n("events")?, edges: n("edges")? }))
}

/// Removes what the retention period allows, batch by batch, until a batch comes back short.
pub(crate) async fn remove_finished(ctx: &Ctx) -> Result<Removed, sqlx::Error> {
    let mut total = Removed::default();
    let Some(period) = ctx.settings.retention.retention.0 else { return Ok(total) };
    let limit = ctx.settings.retention.retention_batch as i64;
    for _ in 0..MAX_BATCHES {
        let Some(r) = remove_batch(ctx, period, limit).await? else { break };
        total.work_packages += r.work_packages;
        total.events += r.events;
        total.edges += r.edges;
        ctx.metrics.removed("work_packages", r.work_packages);
        ctx.metrics.removed("work_package_events", r.events);
        ctx.metrics.removed("work_package_deps", r.edges);
        if (r.work_packages as i64) < limit {
            break;
        }
    }
    if total.work_packages > 0 {
        tracing::info!(
            work_packages = total.work_packages,
            events = total.events,
            edges = total.edges,
            "removed finished work past retention"
        );
    }
    Ok(total)
}

pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.settings.retention.retention_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        ctx.metrics.upkeep();
        let db = remove_finished(&ctx).await.map_err(anyhow::Error::from).map(|_| ());
        let streams = trimming::trim_all(&ctx).await.map(|_| ());
        match db.and(streams) {
            Ok(()) => backoff.reset(),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "retention failed; retrying");
                ctx.stats.note_error();
                backoff.wait(&token).await;
            }
        }
    }
}
