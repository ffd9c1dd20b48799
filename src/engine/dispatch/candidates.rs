//! What may run: the SQL that finds a round's candidates. Read outside any transaction; the
//! claim checks every candidate again under its row lock.

use sqlx::{PgPool, Row};

use super::Scope;
use super::decide::{Candidate, ROUND_LIMIT};

/// Conditions under which a held work package `w` may go: every dependency completed (its
/// count of unmet prerequisites is zero: see migration 0014) and every earlier work package of
/// its lane completed or cancelled, that is, `w` is the first open one of its lane. Asked that
/// way, the lane's head is one step down the index of open lane members (migration 0002)
/// instead of a walk over the lane's whole history. A macro so the queries stay static strings.
macro_rules! may_run {
    () => {
        concat!("w.unmet_deps = 0 AND ", lane_head!())
    };
}

/// The same, with the prerequisites checked edge by edge: the claim's test, under the row's
/// lock, so that the count only ever decides what is read, never what runs.
macro_rules! may_run_checked {
    () => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM work_package_deps d LEFT JOIN work_packages p ON p.wp_id = d.depends_on
                         WHERE d.wp_id = w.wp_id AND p.status IS DISTINCT FROM 'completed')
             AND ",
            lane_head!()
        )
    };
}

macro_rules! lane_head {
    () => {
        "(w.lane IS NULL OR (w.source_ms, w.source_seq) <= (
                SELECT e.source_ms, e.source_seq FROM work_packages e
                WHERE e.lane = w.lane AND e.status NOT IN ('completed', 'cancelled')
                ORDER BY e.source_ms, e.source_seq LIMIT 1))"
    };
}
pub(super) use {lane_head, may_run_checked};

/// When a held work package `w` became free to run: the latest of its ingest, its last
/// dependency's completion, its lane predecessor's end and its retry timer.
macro_rules! eligible_since {
    () => {
        "greatest(w.created_at, w.next_attempt_at,
            (SELECT max(p.completed_at) FROM work_package_deps d JOIN work_packages p ON p.wp_id = d.depends_on
              WHERE d.wp_id = w.wp_id),
            (SELECT coalesce(e.completed_at, e.cancelled_at) FROM work_packages e
              WHERE w.lane IS NOT NULL AND e.lane = w.lane AND (e.source_ms, e.source_seq) < (w.source_ms, w.source_seq)
              ORDER BY e.source_ms DESC, e.source_seq DESC LIMIT 1))"
    };
}

/// The candidates among the wp_ids `$ids` selects, best first: each looked up by its key (a
/// LATERAL subquery that `OFFSET 0` keeps from being flattened), so that no plan made while the
/// table was small, or under statistics that lag behind a backlog, scans the open work to
/// find them (see `store` on `COLLATE "C"`). `$2` is the wp_ids the round was given; `$1` is the
/// limit of each part the scope reads (a page of blocked work, the due work, each target's
/// ready work). The wp_ids a round was given are never cut: they are what an event (a
/// completion, an ingest) made runnable, and one left out would wait for a sweep to find it.
///
/// Best first (v1.4): higher `priority`; then fair share among equal priorities: each fairness
/// key's work takes turns (its first, then its second, ...), a key's turns counted on from
/// the work it has in flight already, so that a key with nothing running goes before one
/// with much; then incoming order. The in-flight count per key is capped at the round's limit,
/// counted once per key, and not at all when the candidates share one key, where it cannot
/// change the order.
macro_rules! candidates_sql {
    ($ids:expr) => {
        concat!(
            "WITH ids AS MATERIALIZED (",
            $ids,
            "),
             c AS MATERIALIZED (
                 SELECT w.wp_id, w.requested_agent, w.work_type, w.trigger_subject, w.target, w.routed_by, w.lane,
                        w.source_ms, w.source_seq, w.plan, w.priority, w.fairness_key, w.created_at, w.next_attempt_at,
                        CASE WHEN w.not_before > now() THEN extract(epoch FROM w.not_before)::float8 END AS delayed_until,
                        row_number() OVER (PARTITION BY w.fairness_key, w.priority ORDER BY w.source_ms, w.source_seq) AS turn
                 FROM (SELECT DISTINCT ids.wp_id FROM ids) k
                 CROSS JOIN LATERAL (SELECT * FROM work_packages x WHERE x.wp_id = k.wp_id OFFSET 0) w
                 WHERE w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait')
                   AND (w.status <> 'retry_wait' OR w.next_attempt_at <= now())
                   AND ",
            may_run!(),
            "),
             busy AS MATERIALIZED (
                 SELECT k.key, (SELECT count(*) FROM (SELECT 1 FROM work_packages d
                                                      WHERE d.status = 'dispatched' AND d.fairness_key = k.key LIMIT $1) x) AS n
                 FROM (SELECT DISTINCT c.fairness_key AS key FROM c) k
                 WHERE (SELECT count(DISTINCT c.fairness_key) FROM c) > 1)
             SELECT w.wp_id, w.requested_agent, w.work_type, w.trigger_subject, w.target, w.routed_by, w.lane,
                    w.source_ms, w.source_seq, w.plan, w.delayed_until, extract(epoch FROM ",
            eligible_since!(),
            ")::float8 AS eligible_since
             FROM c w LEFT JOIN busy b ON b.key = w.fairness_key
             ORDER BY w.priority DESC, w.turn + coalesce(b.n, 0), w.source_ms, w.source_seq"
        )
    };
}

/// The ready work of the open targets `$3` (each with what its agents can take, `$4`), as
/// wp_ids: per target, the head of every fairness key (a skip scan over the keys of the index
/// of ready work, at most a round's worth of keys), and more of each key while the target's
/// agents can take more. Reading every key's head keeps priorities and fair share exact among
/// the keys a round sees, however few slots are free; work held by a pause of its plan or lane
/// is not in that index, and the targets of agents that can take nothing are not asked.
macro_rules! ready_of_targets {
    () => {
        "(SELECT r.wp_id FROM unnest($3::text[], $4::int8[]) AS t(key, free)
          CROSS JOIN LATERAL (
              WITH RECURSIVE keys(k) AS (
                  (SELECT x.fairness_key FROM work_packages x
                   WHERE x.status = 'ready' AND x.held_by IS NULL AND x.target = t.key ORDER BY x.fairness_key LIMIT 1)
                  UNION ALL
                  SELECT (SELECT x.fairness_key FROM work_packages x
                          WHERE x.status = 'ready' AND x.held_by IS NULL AND x.target = t.key AND x.fairness_key > keys.k
                          ORDER BY x.fairness_key LIMIT 1)
                  FROM keys WHERE keys.k IS NOT NULL),
              picked AS MATERIALIZED (SELECT k FROM keys WHERE k IS NOT NULL LIMIT $1)
              SELECT x.wp_id FROM picked CROSS JOIN LATERAL (
                  SELECT x.wp_id FROM work_packages x
                  WHERE x.status = 'ready' AND x.held_by IS NULL AND x.target = t.key AND x.fairness_key = picked.k
                  ORDER BY x.priority DESC, x.source_ms, x.source_seq
                  LIMIT (SELECT greatest(1, (t.free + count(*) - 1) / count(*)) FROM picked)) x) r)"
    };
}

/// The round's candidates, best first: the wp_ids of the scope, ready work of the open targets,
/// and for a sweep a page of blocked work after its point in the incoming order and the
/// delayed or retrying work that came due.
pub(crate) async fn read(pool: &PgPool, scope: &Scope, open: &[(String, i64)]) -> Result<Vec<Candidate>, sqlx::Error> {
    let (targets, free): (Vec<&str>, Vec<i64>) = open.iter().map(|(k, n)| (k.as_str(), *n)).unzip();
    // One statement per kind of scope, so each gets its own plan: a round over a few wp_ids
    // looks them up by key instead of filtering the whole backlog.
    let query = match scope.sweep_from {
        Some((ms, seq)) => sqlx::query(candidates_sql!(concat!(
            "(SELECT x.wp_id FROM work_packages x WHERE x.status = 'blocked' AND x.unmet_deps = 0 AND (x.source_ms, x.source_seq) > ($5, $6)
              ORDER BY x.source_ms, x.source_seq LIMIT $1)
             UNION ALL ",
            ready_of_targets!(),
            "
             UNION ALL (SELECT x.wp_id FROM work_packages x WHERE x.status = 'retry_wait' AND x.next_attempt_at <= now()
                        ORDER BY x.source_ms, x.source_seq LIMIT $1)
             UNION ALL SELECT unnest($2::text[])"
        )))
        .bind(ROUND_LIMIT)
        .bind(&scope.wp_ids)
        .bind(&targets)
        .bind(&free)
        .bind(ms)
        .bind(seq),
        None if !open.is_empty() => {
            sqlx::query(candidates_sql!(concat!("SELECT unnest($2::text[]) AS wp_id UNION ALL ", ready_of_targets!())))
                .bind(ROUND_LIMIT)
                .bind(&scope.wp_ids)
                .bind(&targets)
                .bind(&free)
        }
        None if scope.wp_ids.is_empty() => return Ok(Vec::new()),
        None => sqlx::query(candidates_sql!("SELECT unnest($2::text[]) AS wp_id")).bind(ROUND_LIMIT).bind(&scope.wp_ids),
    };
    query
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| {
            Ok(Candidate {
                wp_id: r.try_get("wp_id")?,
                requested_agent: r.try_get("requested_agent")?,
                work_type: r.try_get("work_type")?,
                trigger: r.try_get("trigger_subject")?,
                target: r.try_get("target")?,
                routed_by: r.try_get("routed_by")?,
                lane: r.try_get("lane")?,
                order: (r.try_get("source_ms")?, r.try_get("source_seq")?),
                plan: r.try_get("plan")?,
                delayed_until: r.try_get("delayed_until")?,
                eligible_since: r.try_get("eligible_since")?,
            })
        })
        .collect()
}
