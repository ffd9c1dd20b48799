//! (v1.6) Agents' live progress: a heartbeat may carry `progress` (text, at most 200 bytes) and
//! `progress_fraction` (0 to 1). The latest of each running dispatch is kept in
//! `work_package_progress`, one row per work package, written at most once a second per work
//! package whatever the agent sends (a flood costs one statement per batch and no row
//! versions), and only for the dispatch that is running.

use std::collections::HashMap;

use sqlx::PgPool;

use crate::core::wait::PROGRESS_EVERY;

/// One heartbeat's progress.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub wp_id: String,
    pub dispatch_id: String,
    pub text: Option<String>,
    pub fraction: Option<f32>,
}

/// Records the latest progress of each running dispatch among `reports` (the last of a batch
/// wins), unless its work package's progress was written less than a second ago by the same
/// dispatch. Returns how many rows were written.
pub(crate) async fn record(pool: &PgPool, reports: Vec<Report>) -> Result<u64, sqlx::Error> {
    let mut last: HashMap<String, Report> = HashMap::new();
    for r in reports.into_iter().filter(|r| r.text.is_some() || r.fraction.is_some()) {
        last.insert(r.wp_id.clone(), r);
    }
    if last.is_empty() {
        return Ok(0);
    }
    let reports: Vec<Report> = last.into_values().collect();
    Ok(sqlx::query(
        "INSERT INTO work_package_progress (wp_id, dispatch_id, text, fraction, at)
         SELECT h.wp_id, h.dispatch_id, h.text, h.fraction, now()
         FROM unnest($1::text[], $2::text[], $3::text[], $4::float4[]) AS h(wp_id, dispatch_id, text, fraction)
         CROSS JOIN LATERAL (SELECT x.status, x.dispatch_id FROM work_packages x WHERE x.wp_id = h.wp_id OFFSET 0) w
         WHERE w.status COLLATE \"C\" = 'dispatched' AND w.dispatch_id = h.dispatch_id
         ON CONFLICT (wp_id) DO UPDATE SET dispatch_id = EXCLUDED.dispatch_id, text = EXCLUDED.text,
                                           fraction = EXCLUDED.fraction, at = EXCLUDED.at
         WHERE work_package_progress.dispatch_id <> EXCLUDED.dispatch_id
            OR work_package_progress.at <= EXCLUDED.at - make_interval(secs => $5::float8)",
    )
    .bind(reports.iter().map(|r| r.wp_id.as_str()).collect::<Vec<_>>())
    .bind(reports.iter().map(|r| r.dispatch_id.as_str()).collect::<Vec<_>>())
    .bind(reports.iter().map(|r| r.text.as_deref()).collect::<Vec<_>>())
    .bind(reports.iter().map(|r| r.fraction).collect::<Vec<_>>())
    .bind(PROGRESS_EVERY.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// A progress row as the live view sends it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Live {
    pub wp_id: String,
    pub dispatch_id: String,
    pub text: Option<String>,
    pub fraction: Option<f32>,
    /// RFC 3339, UTC.
    pub at: String,
    /// Microseconds since the epoch: where the next read starts.
    #[serde(skip)]
    pub at_us: i64,
}

/// The progress of running dispatches recorded after `since_us` (microseconds since the epoch),
/// oldest first, at most `limit`.
pub async fn since(pool: &PgPool, since_us: i64, limit: i64) -> Result<Vec<Live>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.wp_id, p.dispatch_id, p.text, p.fraction,
                to_char(p.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at,
                (extract(epoch FROM p.at) * 1000000)::int8 AS at_us
         FROM work_package_progress p
         WHERE p.at > to_timestamp($1::float8 / 1000000.0) - interval '1 millisecond'
           AND (extract(epoch FROM p.at) * 1000000)::int8 > $1::int8
         ORDER BY p.at LIMIT $2",
    )
    .bind(since_us)
    .bind(limit)
    .fetch_all(pool)
    .await
}
