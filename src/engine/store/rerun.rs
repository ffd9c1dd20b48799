//! Operator rerun (contract v1.6): a finished work package (`completed`, `failed` or
//! `cancelled`) runs again as a new attempt, and with `downstream` so does everything that
//! depends on it. The attempt counter goes on, so the new `dispatch_id` is one never
//! published before; the earlier runs stay in the history.

use sqlx::{PgPool, Row};

/// Why a rerun was refused, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum RerunRefused {
    #[error("no work package {0} (never submitted, or removed by retention)")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Reopens `wp_id` (and with `downstream` its dependents, transitively) in one transaction.
/// Refused, changing nothing, when:
/// - `wp_id` is open or running (only finished work runs again);
/// - one of them is running, or another member of one of their lanes is (a lane runs one at
///   a time, and the reopened member would go before the later one ends);
/// - a dependency outside the reopened set is no longer stored (retention removed it): the
///   rerun would wait for it for ever.
///
/// Dependents that are open stay open and wait for the reopened work as any dependent does.
/// The dependencies outside the set are locked `FOR KEY SHARE` until the commit, so retention
/// (which skips locked rows) cannot remove them meanwhile; after it, the reopened work holds
/// them (retention keeps what open work depends on). Returns the reopened work packages.
pub async fn rerun(pool: &PgPool, wp_id: &str, downstream: bool) -> Result<Vec<String>, RerunRefused> {
    let mut tx = pool.begin().await?;
    let head: Option<String> =
        sqlx::query_scalar("SELECT status FROM work_packages WHERE wp_id = $1 FOR UPDATE").bind(wp_id).fetch_optional(&mut *tx).await?;
    let Some(status) = head else { return Err(RerunRefused::NotFound(wp_id.to_string())) };
    if !matches!(status.as_str(), "completed" | "failed" | "cancelled") {
        return Err(RerunRefused::Conflict(format!(
            "{wp_id} is {status}: only completed, failed or cancelled work runs again (cancel it first, or wait for it)"
        )));
    }
    let set: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "WITH RECURSIVE down(id) AS (
             SELECT $1::text
             UNION
             SELECT d.wp_id FROM work_package_deps d JOIN down ON d.depends_on = down.id WHERE $2)
         SELECT w.wp_id, w.status, w.lane FROM down JOIN work_packages w ON w.wp_id = down.id ORDER BY w.wp_id FOR UPDATE OF w",
    )
    .bind(wp_id)
    .bind(downstream)
    .fetch_all(&mut *tx)
    .await?;
    if let Some((w, _, _)) = set.iter().find(|(_, s, _)| s == "dispatched") {
        return Err(RerunRefused::Conflict(format!("{w} depends on {wp_id} and is running: cancel it or wait for it, then rerun")));
    }
    let ids: Vec<&str> = set.iter().map(|(w, _, _)| w.as_str()).collect();
    let lanes: Vec<&str> = set.iter().filter_map(|(_, _, l)| l.as_deref()).collect();
    if !lanes.is_empty() {
        let busy: Option<(String, String)> = sqlx::query_as(
            "SELECT x.wp_id, x.lane FROM work_packages x
             WHERE x.lane = ANY($1) AND x.status = 'dispatched' AND NOT x.wp_id = ANY($2) LIMIT 1",
        )
        .bind(&lanes)
        .bind(&ids)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((w, lane)) = busy {
            return Err(RerunRefused::Conflict(format!(
                "{w} of lane {lane} is running, and a lane runs one work package at a time: rerun once it has ended"
            )));
        }
    }
    let deps = sqlx::query(
        "SELECT d.wp_id, d.depends_on, (SELECT 1 FROM work_packages p WHERE p.wp_id = d.depends_on FOR KEY SHARE) IS NOT NULL AS stored
         FROM work_package_deps d WHERE d.wp_id = ANY($1) AND NOT d.depends_on = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    for d in &deps {
        if !d.try_get::<bool, _>("stored")? {
            let (w, dep): (String, String) = (d.try_get("wp_id")?, d.try_get("depends_on")?);
            return Err(RerunRefused::Conflict(format!(
                "{w} depends on {dep}, which is no longer stored (removed by retention): it would wait for ever; submit {dep} again first"
            )));
        }
    }
    // The earlier outcome goes into the reason, and so into the history of the reopening.
    let reopened: Vec<String> = sqlx::query_scalar(
        "UPDATE work_packages w SET status = 'blocked', retry_base = w.attempts, next_attempt_at = NULL, held_by = NULL,
                completed_at = NULL, failed_at = NULL, cancelled_at = NULL, result = NULL, updated_at = now(),
                wait_reason = CASE WHEN w.wp_id = $1 THEN 'rerun by an operator' ELSE 'rerun with ' || $1 END
                              || ' (was ' || w.status || coalesce(' as ' || w.dispatch_id, '')
                              || coalesce(': ' || left(CASE WHEN w.status = 'completed' THEN w.result ELSE w.last_error END, 500), '')
                              || ')'
         WHERE w.wp_id = ANY($2) AND w.status IN ('completed', 'failed', 'cancelled', 'ready')
         RETURNING w.wp_id",
    )
    .bind(wp_id)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    // The unmet prerequisites (migration 0014), counted again for what is open now: the
    // reopened work and whatever open work depends on it, whose prerequisite it no longer
    // meets (a `ready` one waits again, as `blocked`). Their prerequisites are locked first,
    // as for a retry.
    let recount: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT x FROM (SELECT unnest($1::text[]) AS x
                                 UNION ALL SELECT d.wp_id FROM work_package_deps d WHERE d.depends_on = ANY($2)) k",
    )
    .bind(&ids)
    .bind(&reopened)
    .fetch_all(&mut *tx)
    .await?;
    super::lock_prerequisites_of(&mut tx, &recount).await?;
    sqlx::query(concat!(
        "UPDATE work_packages x SET unmet_deps = c.n,
                status = CASE WHEN x.status = 'ready' AND c.n > 0 THEN 'blocked' ELSE x.status END
         FROM (SELECT w.wp_id, ",
        unmet_count!(),
        " AS n FROM work_packages w WHERE w.wp_id = ANY($1) AND w.status IN ('blocked', 'ready', 'retry_wait')) c
         WHERE x.wp_id = c.wp_id"
    ))
    .bind(&recount)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut reopened = reopened;
    reopened.sort();
    Ok(reopened)
}
