//! Operator cancel (contract v1.6): of one work package or of a plan's open work, running
//! work included, and with them every work package that depends on them and has not
//! completed. A dispatch that was running is returned with its agent, whom the caller tells.

use sqlx::{PgPool, Row};

/// One work package the cancel reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancelled {
    pub wp_id: String,
    /// (agent, dispatch_id) when it was `dispatched`: that agent may be running it now.
    pub running: Option<(String, String)>,
}

/// What to cancel: one work package, or every open one of a plan.
#[derive(Debug, Clone, Copy)]
pub enum Roots<'a> {
    One(&'a str),
    Plan(&'a str),
}

/// Cancels the roots and, transitively, what depends on them and has not completed, in one
/// transaction. The rows are locked before they are read, so a completion that commits first
/// wins (the work package stays completed) and one that commits after finds it cancelled and
/// is ignored. Its slot under `max_in_flight` is free with the commit (the in-flight triggers
/// of migration 0003 count it out); an unpublished claim of it is dropped by the scheduler.
/// Returns, besides what was cancelled, the work packages that may go now (lane successors).
pub async fn cancel_many(pool: &PgPool, roots: Roots<'_>) -> Result<(Vec<Cancelled>, Vec<String>), sqlx::Error> {
    let (one, plan) = match roots {
        Roots::One(w) => (Some(w), None),
        Roots::Plan(p) => (None, Some(p)),
    };
    let mut tx = pool.begin().await?;
    // Exclusive against the ingest of dependents (which takes this lock, shared or exclusive,
    // for every batch with dependencies): a dependent ingested at the same moment is either
    // committed before this reads the edges, and cancelled with the rest, or ingested after
    // this commits, and then sees its dependency cancelled (`cancel_late_dependents`).
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(super::DAG_LOCK).execute(&mut *tx).await?;
    let rows = sqlx::query(
        "WITH RECURSIVE roots(id) AS (
             SELECT $1::text WHERE $1::text IS NOT NULL
             UNION ALL
             SELECT w.wp_id FROM work_packages w
             WHERE $2::text IS NOT NULL AND w.plan = $2 AND w.status NOT IN ('completed', 'cancelled')),
         down(id, root) AS (
             SELECT id, id FROM roots
             UNION
             SELECT d.wp_id, down.root FROM work_package_deps d JOIN down ON d.depends_on = down.id),
         picked AS (SELECT DISTINCT ON (id) id, root FROM down ORDER BY id, (id = root) DESC, root),
         locked AS MATERIALIZED (
             SELECT w.wp_id, w.status AS was, w.agent_id, w.dispatch_id, p.root FROM picked p
             JOIN work_packages w ON w.wp_id = p.id
             WHERE w.status NOT IN ('completed', 'cancelled')
             ORDER BY w.wp_id FOR UPDATE OF w)
         UPDATE work_packages w SET status = 'cancelled', cancelled_at = now(), updated_at = now(), next_attempt_at = NULL,
                held_by = NULL,
                wait_reason = CASE WHEN w.wp_id <> l.root THEN 'cancelled because ' || l.root || ' was cancelled'
                                   WHEN $2::text IS NOT NULL THEN 'cancelled by an operator with its plan ' || $2
                                   WHEN l.was = 'dispatched' THEN 'cancelled by an operator while running as ' || l.dispatch_id
                                   ELSE 'cancelled by an operator' END
         FROM locked l WHERE w.wp_id = l.wp_id AND w.status NOT IN ('completed', 'cancelled')
         RETURNING w.wp_id, l.was, l.agent_id, l.dispatch_id",
    )
    .bind(one)
    .bind(plan)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let was: String = r.try_get("was")?;
        let running = match (was.as_str(), r.try_get::<Option<String>, _>("agent_id")?, r.try_get::<Option<String>, _>("dispatch_id")?) {
            ("dispatched", Some(agent), Some(dispatch)) => Some((agent, dispatch)),
            _ => None,
        };
        out.push(Cancelled { wp_id: r.try_get("wp_id")?, running });
    }
    out.sort_by(|a, b| a.wp_id.cmp(&b.wp_id));
    let ids: Vec<String> = out.iter().map(|c| c.wp_id.clone()).collect();
    // Cancelled is not completed: it meets no prerequisite, and only frees lanes.
    let unblocked = super::lane_successors(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok((out, unblocked))
}

/// Records, in the history of each work package that is `cancelled`, the reports that came
/// for it anyway (an agent that finished before it heard of the cancel, or that does not read
/// cancel notices): `(wp_id, dispatch_id, kind)`. Nothing else changes: the status stays.
pub(crate) async fn record_late_reports(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    reports: &[(String, Option<String>, &str)],
) -> Result<(), sqlx::Error> {
    if reports.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO work_package_events (wp_id, status, agent_id, dispatch_id, detail)
         SELECT w.wp_id, 'cancelled', w.agent_id, coalesce(r.dispatch_id, w.dispatch_id),
                r.kind || ' of ' || coalesce(r.dispatch_id, r.wp_id) || ' arrived after the cancel; ignored'
         FROM unnest($1::text[], $2::text[], $3::text[]) AS r(wp_id, dispatch_id, kind)
         CROSS JOIN LATERAL (SELECT x.wp_id, x.agent_id, x.dispatch_id, x.status FROM work_packages x WHERE x.wp_id = r.wp_id OFFSET 0) w
         WHERE w.status COLLATE \"C\" = 'cancelled'",
    )
    .bind(reports.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
    .bind(reports.iter().map(|r| r.1.as_deref()).collect::<Vec<_>>())
    .bind(reports.iter().map(|r| r.2).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// (v1.6) Cancels the work packages just ingested whose dependency is `cancelled` already, and
/// what in the batch depends on them: cancellation reaches a dependent whenever it arrives,
/// not only those stored at the cancel (a plan cancelled while its producer still submits
/// it). Called in the ingest transaction, only for batches with dependencies; one statement.
pub(crate) async fn cancel_late_dependents(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    specs: &[crate::core::entry::WorkPackageSpec],
    outcomes: &[super::IngestOutcome],
) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = specs
        .iter()
        .zip(outcomes)
        .filter(|(s, o)| !s.depends_on.is_empty() && **o == super::IngestOutcome::Inserted)
        .map(|(s, _)| s.wp_id.as_str())
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH RECURSIVE doomed(id, root) AS (
             SELECT d.wp_id, d.depends_on FROM unnest($1::text[]) AS k(id)
             CROSS JOIN LATERAL (SELECT x.wp_id, x.depends_on FROM work_package_deps x WHERE x.wp_id = k.id OFFSET 0) d
             JOIN work_packages p ON p.wp_id = d.depends_on
             WHERE p.status COLLATE \"C\" = 'cancelled'
             UNION
             SELECT d.wp_id, doomed.id FROM work_package_deps d JOIN doomed ON d.depends_on = doomed.id
             WHERE d.wp_id = ANY($1)),
         one AS (SELECT DISTINCT ON (id) id, root FROM doomed ORDER BY id, root)
         UPDATE work_packages w SET status = 'cancelled', cancelled_at = now(), updated_at = now(), next_attempt_at = NULL,
                wait_reason = 'cancelled because ' || one.root || ' was cancelled'
         FROM one WHERE w.wp_id = one.id AND w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait')",
    )
    .bind(&ids)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
