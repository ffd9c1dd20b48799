//! (v1.6) Events kept for the work packages that wait for their key: delivering one, and
//! settling work that comes to wait for the key of one kept earlier. Each runs under the locks
//! of its keys, so that an event and a work package coming to wait for its key never miss each
//! other: whichever commits second sees the other. Below both `waits` (which dispatches what
//! an event unblocks) and `dispatch` (whose rounds put work into `waiting`).

use sqlx::{PgPool, Postgres, Transaction};

use crate::engine::context::{Ctx, Stats};
use crate::engine::store::{ids_of, unblocked_by};

/// Namespace of the per-key locks that order an event against work coming to wait for it.
const EVENT_LOCKS: i32 = 0x6766;
/// Keys settled per sweep; the rest wait for the next one.
const SWEEP_LIMIT: i64 = 500;

/// What became of an event.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Delivered {
    /// The work packages it completed.
    pub completed: Vec<String>,
    /// None waited: it is kept for those that come to wait for its key.
    pub kept: bool,
    /// A redelivery of an event already taken (same source): nothing done.
    pub duplicate: bool,
    #[serde(skip)]
    pub unblocked: Vec<String>,
}

async fn lock_keys(tx: &mut Transaction<'_, Postgres>, keys: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock($1, hashtext(s.k))) FROM (SELECT DISTINCT k FROM unnest($2::text[]) AS k ORDER BY k) s",
    )
    .bind(EVENT_LOCKS)
    .bind(keys)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Delivers one event: completes every work package waiting for `key` with `fields` (a JSON
/// object) as its result, or keeps the event for those to come. `source` names where it came
/// from (`stream:<id>`; None: the API, which gets a fresh one): a second event of the same
/// source does nothing. Under the key's lock, so that a work package coming to wait for the
/// key either sees the event kept or is seen waiting by it (see `settle`).
pub(crate) async fn deliver(pool: &PgPool, key: &str, fields: &serde_json::Value, source: Option<&str>) -> Result<Delivered, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_keys(&mut tx, &[key.to_string()]).await?;
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO kept_events (key, fields, source) VALUES ($1, $2, coalesce($3, 'api:' || gen_random_uuid()))
         ON CONFLICT (source) DO NOTHING RETURNING id",
    )
    .bind(key)
    .bind(fields)
    .bind(source)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = id else {
        tx.rollback().await?;
        return Ok(Delivered { duplicate: true, ..Delivered::default() });
    };
    let completed = complete_with(&mut tx, &[id]).await?;
    let unblocked = if completed.is_empty() { Vec::new() } else { ids_of(&unblocked_by(&mut tx, &completed).await?) };
    tx.commit().await?;
    Ok(Delivered { kept: completed.is_empty(), completed, duplicate: false, unblocked })
}

/// Completes the work packages waiting for the keys of the kept events `ids` (each event the
/// oldest unconsumed of its key), and marks the events that did so consumed. Returns the work
/// packages completed. The caller holds the keys' locks.
async fn complete_with(tx: &mut Transaction<'_, Postgres>, ids: &[i64]) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH ev AS MATERIALIZED (SELECT id, key, fields, source FROM kept_events WHERE id = ANY($1) AND consumed_at IS NULL),
              done AS (
                  UPDATE work_packages w SET status = 'completed', completed_at = now(), updated_at = now(), wait_due_at = NULL,
                         result = ev.fields::text, wait_reason = 'event ' || ev.key || ' arrived (' || ev.source || ')'
                  FROM ev WHERE w.wait_key = ev.key AND w.status = 'waiting' AND w.wait_for = 'event'
                  RETURNING w.wp_id, ev.id),
              used AS (UPDATE kept_events k SET consumed_at = now() WHERE k.id IN (SELECT id FROM done))
         SELECT wp_id FROM done",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await
}

/// Completes work packages that came to wait for a key whose event was kept: `wp_ids` just
/// became waiting (ingest, a dispatch round), or, with `None`, any waiting work package with a
/// kept event (the sweep, which also settles what a crash between the two left). Returns the
/// work packages this may unblock.
pub(crate) async fn settle_keys(pool: &PgPool, wp_ids: Option<&[String]>) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    let keys: Vec<String> = match wp_ids {
        Some(ids) => {
            sqlx::query_scalar(
                "SELECT DISTINCT w.wait_key FROM unnest($1::text[]) AS k(id)
                 CROSS JOIN LATERAL (SELECT x.wait_key FROM work_packages x WHERE x.wp_id = k.id OFFSET 0) w
                 WHERE w.wait_key IS NOT NULL
                   AND EXISTS (SELECT 1 FROM kept_events e WHERE e.key = w.wait_key AND e.consumed_at IS NULL)",
            )
            .bind(ids)
            .fetch_all(pool)
            .await?
        }
        None => {
            sqlx::query_scalar(
                "SELECT DISTINCT e.key FROM kept_events e
                 WHERE e.consumed_at IS NULL
                   AND EXISTS (SELECT 1 FROM work_packages w WHERE w.wait_key = e.key AND w.status = 'waiting' AND w.wait_for = 'event')
                 LIMIT $1",
            )
            .bind(SWEEP_LIMIT)
            .fetch_all(pool)
            .await?
        }
    };
    if keys.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut tx = pool.begin().await?;
    lock_keys(&mut tx, &keys).await?;
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT DISTINCT ON (key) id FROM kept_events WHERE key = ANY($1) AND consumed_at IS NULL ORDER BY key, id")
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
    let completed = complete_with(&mut tx, &ids).await?;
    let unblocked = if completed.is_empty() { Vec::new() } else { ids_of(&unblocked_by(&mut tx, &completed).await?) };
    tx.commit().await?;
    Ok((completed, unblocked))
}

/// `settle_keys` for work packages that just became waiting, from the engine: what the kept
/// events completed is dispatched onward by this replica's next round.
pub(crate) async fn settle(ctx: &Ctx, wp_ids: &[String]) -> anyhow::Result<()> {
    let (completed, unblocked) = settle_keys(&ctx.pool, Some(wp_ids)).await?;
    ctx.metrics.waits_resolved("event", completed.len() as u64);
    Stats::add(&ctx.stats.completed, completed.len() as u64);
    ctx.gate_held.lock().unwrap_or_else(|p| p.into_inner()).extend(unblocked);
    Ok(())
}
