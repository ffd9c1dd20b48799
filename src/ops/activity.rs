//! The activity of the last minutes, per minute: work packages dispatched, completed and
//! failed, and how long work that could run waited for its dispatch. The dashboard draws it.
//!
//! It is read from `work_package_events`, which has no index on `at`. Events are numbered and
//! timed by the same insert (`id` from a sequence, `at` = `clock_timestamp()`), so `at` grows
//! with `id` up to the few microseconds concurrent inserts may interleave: the first event of
//! the window is found by bisecting the primary key (about 40 index probes, whatever the
//! history holds), and only the window's events are read. Events deleted by retention leave
//! gaps in the ids, which the bisection steps over.

use serde::Serialize;
use sqlx::{PgPool, Row};

/// The longest window one read covers; its cost grows with the events in it.
pub(crate) const MAX_MINUTES: i64 = 180;
/// Dispatches per minute whose wait is measured: each costs a few index lookups, and a
/// minute's percentiles need no more.
pub(crate) const LATENCY_SAMPLE: i64 = 200;

#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// The minute's start, RFC 3339, UTC.
    pub minute: String,
    /// Dispatches (every attempt) in the minute.
    pub dispatched: i64,
    pub completed: i64,
    /// Attempts that failed (retried or not).
    pub failed: i64,
    /// Dispatch latency of the minute's first attempts, in milliseconds; absent without any.
    pub latency_ms: Option<Latency>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
    /// How many dispatches these figures are over (at most `LATENCY_SAMPLE`, the first of the
    /// minute).
    pub samples: i64,
}

/// One bucket per minute of the last `minutes`, oldest first, the current minute last.
///
/// Latency is measured as the engine's histogram measures it: from when a work package
/// could run (ingested, its `not_before` passed, its last dependency completed, its lane
/// predecessor ended) to its dispatch. Only first attempts count, since a retry's wait is its
/// backoff. A pause's wait counts: the chart shows what the pause cost.
pub async fn activity(pool: &PgPool, minutes: i64) -> Result<Vec<Bucket>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH RECURSIVE
         since AS (SELECT now() - make_interval(mins => $1::int) AS t),
         search (lo, hi, ans) AS (
             SELECT min(id), max(id) + 1, max(id) + 1 FROM work_package_events
             UNION ALL
             SELECT CASE WHEN m.at < (SELECT t FROM since) THEN m.id + 1 ELSE s.lo END,
                    CASE WHEN m.at < (SELECT t FROM since) THEN s.hi ELSE s.lo + (s.hi - s.lo) / 2 END,
                    CASE WHEN m.at >= (SELECT t FROM since) THEN m.id ELSE s.ans END
             FROM search s
             LEFT JOIN LATERAL (SELECT e.id, e.at FROM work_package_events e
                                 WHERE e.id >= s.lo + (s.hi - s.lo) / 2 AND e.id < s.hi
                                 ORDER BY e.id LIMIT 1) m ON true
             WHERE s.lo < s.hi),
         ev AS MATERIALIZED (
             SELECT e.id, e.wp_id, e.at, e.status, e.dispatch_id, date_trunc('minute', e.at) AS minute
             FROM work_package_events e
             -- Bounded on both sides, so that the planner, not knowing the bounds, takes
             -- them for a narrow range of the key (a lone lower bound it takes for a third
             -- of the table, and scans the whole of it).
             WHERE e.id >= (SELECT min(ans) FROM search) AND e.id < (SELECT max(hi) FROM search)
               AND e.at >= (SELECT t FROM since)),
         sampled AS MATERIALIZED (
             SELECT x.wp_id, x.at, x.minute FROM (
                 SELECT ev.wp_id, ev.at, ev.minute, row_number() OVER (PARTITION BY ev.minute ORDER BY ev.id) AS n
                 FROM ev WHERE ev.status = 'dispatched' AND ev.dispatch_id = ev.wp_id || ':1') x
             WHERE x.n <= $2),
         lat AS (
             SELECT s.minute,
                    greatest(0, extract(epoch FROM s.at - greatest(w.created_at, w.not_before, deps.t, pred.t)) * 1000)::float8 AS ms
             FROM sampled s
             JOIN work_packages w ON w.wp_id = s.wp_id
             LEFT JOIN LATERAL (SELECT max(p.completed_at) AS t FROM work_package_deps d
                                 JOIN work_packages p ON p.wp_id = d.depends_on WHERE d.wp_id = w.wp_id) deps ON true
             LEFT JOIN LATERAL (SELECT coalesce(e.completed_at, e.cancelled_at) AS t FROM work_packages e
                                 WHERE w.lane IS NOT NULL AND e.lane = w.lane
                                   AND (e.source_ms, e.source_seq) < (w.source_ms, w.source_seq)
                                 ORDER BY e.source_ms DESC, e.source_seq DESC LIMIT 1) pred ON true),
         counts AS (
             SELECT minute, count(*) FILTER (WHERE status = 'dispatched') AS dispatched,
                    count(*) FILTER (WHERE status = 'completed') AS completed,
                    count(*) FILTER (WHERE status IN ('failed', 'retry_wait')) AS failed
             FROM ev GROUP BY minute),
         lats AS (
             SELECT minute, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95, max(ms) AS max, count(*) AS n
             FROM lat GROUP BY minute)
         SELECT to_char(m AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS minute,
                coalesce(c.dispatched, 0) AS dispatched, coalesce(c.completed, 0) AS completed,
                coalesce(c.failed, 0) AS failed, l.p50, l.p95, l.max, l.n
         FROM since, generate_series(date_trunc('minute', since.t) + interval '1 minute', date_trunc('minute', now()),
                                     interval '1 minute') AS m
         LEFT JOIN counts c ON c.minute = m
         LEFT JOIN lats l ON l.minute = m
         ORDER BY m",
    )
    .bind(minutes.clamp(1, MAX_MINUTES))
    .bind(LATENCY_SAMPLE)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let n: Option<i64> = r.try_get("n")?;
            let latency_ms = match n {
                Some(samples) if samples > 0 => {
                    Some(Latency { p50: r.try_get("p50")?, p95: r.try_get("p95")?, max: r.try_get("max")?, samples })
                }
                _ => None,
            };
            Ok(Bucket {
                minute: r.try_get("minute")?,
                dispatched: r.try_get("dispatched")?,
                completed: r.try_get("completed")?,
                failed: r.try_get("failed")?,
                latency_ms,
            })
        })
        .collect()
}
