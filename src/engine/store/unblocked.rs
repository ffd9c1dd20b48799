//! What the end of a work package may let go: its dependents whose last unmet prerequisite it
//! was, and the next open member of its lane.

use sqlx::{Postgres, Row, Transaction};

/// A work package that a completion (or a cancel) may have let go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unblocked {
    pub wp_id: String,
    /// Its row holds it for nothing but its route and its lane's order: `blocked`, every
    /// prerequisite met (its last one just now, or it is a lane successor with none left), no
    /// approval or event to wait for, no `not_before` still to come. Such work may be claimed
    /// in the transaction that let it go (`dispatch::at_once`), lane members only behind the
    /// lane gate. Its routing columns below are read only then.
    pub free: bool,
    pub lane: Option<String>,
    pub requested_agent: Option<String>,
    pub work_type: Option<String>,
    pub trigger: Option<String>,
    pub target: Option<String>,
    pub routed_by: Option<String>,
    pub plan: Option<String>,
    pub order: (i64, i64),
}

/// The wp_ids of `unblocked`, in order.
pub(crate) fn ids_of(unblocked: &[Unblocked]) -> Vec<String> {
    unblocked.iter().map(|u| u.wp_id.clone()).collect()
}

/// The next open member `n` of the lane of each work package `$1` names: what its end may let
/// go. Shared by completions (`unblocked_by`) and cancels (`lane_successors`); the caller
/// writes the SELECT list over `n`.
macro_rules! lane_successors_from {
    () => {
        " FROM work_packages w
           CROSS JOIN LATERAL (SELECT x.wp_id, x.status, x.unmet_deps, x.wait_for, x.not_before, x.lane, x.requested_agent,
                                      x.work_type, x.trigger_subject, x.target, x.routed_by, x.plan, x.source_ms, x.source_seq
                               FROM work_packages x
                               WHERE x.lane = w.lane AND (x.source_ms, x.source_seq) > (w.source_ms, w.source_seq)
                                 AND x.status NOT IN ('completed', 'cancelled')
                               ORDER BY x.source_ms, x.source_seq LIMIT 1) n
         WHERE w.wp_id = ANY($1) AND w.lane IS NOT NULL"
    };
}

/// Whether a row `r` holds its work package for nothing but its route and its lane's order,
/// given its count of unmet prerequisites.
macro_rules! free_row {
    ($r:literal) => {
        concat!(
            "(",
            $r,
            ".status = 'blocked' AND ",
            $r,
            ".unmet_deps <= 0 AND ",
            $r,
            ".wait_for IS NULL AND (",
            $r,
            ".not_before IS NULL OR ",
            $r,
            ".not_before <= now()))"
        )
    };
}

/// Work packages that the completion of `completed` may let go: the dependents whose last
/// unmet prerequisite they were (each dependent's count decremented, in this statement, by
/// how many of them it waited for) and each one's lane successor, each once. Call it once, in
/// the transaction that completed them, and only with work packages that became `completed`
/// in it: the count is exact only if every completion decrements it once.
pub(crate) async fn unblocked_by(tx: &mut Transaction<'_, Postgres>, completed: &[String]) -> Result<Vec<Unblocked>, sqlx::Error> {
    let rows = sqlx::query(concat!(
        "WITH met AS MATERIALIZED (
             SELECT d.wp_id, count(*)::int AS n FROM (SELECT DISTINCT id FROM unnest($1::text[]) AS k(id)) k
             CROSS JOIN LATERAL (SELECT d.wp_id FROM work_package_deps d WHERE d.depends_on = k.id OFFSET 0) d
             GROUP BY d.wp_id),
         counted AS (
             UPDATE work_packages w SET unmet_deps = w.unmet_deps - met.n
             FROM met WHERE w.wp_id = met.wp_id AND w.status COLLATE \"C\" = 'blocked'
             RETURNING w.wp_id, w.unmet_deps, w.lane, w.requested_agent, w.work_type, w.trigger_subject, w.target, w.routed_by,
                       w.plan, w.source_ms, w.source_seq, ",
        free_row!("w"),
        " AS free)
         SELECT wp_id, free, lane, requested_agent, work_type, trigger_subject, target, routed_by, plan, source_ms, source_seq
         FROM counted WHERE unmet_deps <= 0
         UNION ALL
         SELECT n.wp_id, ",
        free_row!("n"),
        ", n.lane, n.requested_agent, n.work_type, n.trigger_subject, n.target, n.routed_by, n.plan, n.source_ms, n.source_seq",
        lane_successors_from!()
    ))
    .bind(completed)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: Vec<Unblocked> = Vec::with_capacity(rows.len());
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for r in rows {
        let wp_id: String = r.try_get("wp_id")?;
        let free: bool = r.try_get("free")?;
        // A dependent that is also a lane successor comes twice, the second time as it was
        // before this statement counted it down: free if either says so (the claim checks
        // every prerequisite again).
        if let Some(i) = at.get(&wp_id) {
            out[*i].free |= free;
            continue;
        }
        at.insert(wp_id.clone(), out.len());
        out.push(Unblocked {
            wp_id,
            free,
            lane: r.try_get("lane")?,
            requested_agent: r.try_get("requested_agent")?,
            work_type: r.try_get("work_type")?,
            trigger: r.try_get("trigger_subject")?,
            target: r.try_get("target")?,
            routed_by: r.try_get("routed_by")?,
            plan: r.try_get("plan")?,
            order: (r.try_get("source_ms")?, r.try_get("source_seq")?),
        });
    }
    Ok(out)
}

/// (v1.6) The next open member of each one's lane: what the end of `ended` (cancelled, not
/// completed) may let go. No prerequisite is met by it, so no count changes.
pub(crate) async fn lane_successors(tx: &mut Transaction<'_, Postgres>, ended: &[String]) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(concat!("SELECT DISTINCT n.wp_id", lane_successors_from!())).bind(ended).fetch_all(&mut **tx).await
}
