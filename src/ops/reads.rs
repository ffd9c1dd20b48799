//! Every PostgreSQL read of the operators' surface but the activity chart's (`ops::activity`):
//! the CLI, the admin API, `/metrics`, the dashboard, the dev stack and `submit --wait`.
//! Read-only; the engine's own statements live in `engine::store` and `engine::dispatch`, which
//! own the tables.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use sqlx::{PgPool, Row};

/// The operators' pool: `size` connections, opened when first needed (the engine's pool has
/// applied the migrations), each statement limited to `statement_timeout`. Waiting for one
/// of them is short; a read that cannot get one answers 503 rather than queue.
pub(crate) fn pool(url: &str, size: u32, statement_timeout: std::time::Duration) -> anyhow::Result<PgPool> {
    let options = crate::engine::store::session_options(url, "ge-orchestrator-ops", Some(statement_timeout))?;
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy_with(options))
}

#[derive(Debug, Clone, Serialize)]
pub struct WpView {
    pub wp_id: String,
    pub status: String,
    pub agent_id: Option<String>,
    pub lane: Option<String>,
    pub attempts: i32,
    pub dispatch_id: Option<String>,
    /// Why it is not done yet, in words; empty when it is done.
    pub why: String,
    pub work_type: Option<String>,
    pub route: Option<String>,
    /// The DAG edges out of this work package (what it waits for), sorted.
    pub depends_on: Vec<String>,
    /// The incoming entry's id: the lane order.
    pub source_id: String,
    /// RFC 3339, UTC.
    pub updated_at: String,
    /// The plan it belongs to (v1.4).
    pub plan: Option<String>,
    /// Its dispatch priority, -100..100 (v1.4).
    pub priority: i16,
    /// RFC 3339, UTC: it may not run before (v1.4).
    pub not_before: Option<String>,
    /// (v1.6) `approval` or `event`: it waits for that instead of an agent.
    pub wait_for: Option<String>,
    /// (v1.6) The key of the event it waits for.
    pub wait_key: Option<String>,
    /// (v1.6) RFC 3339, UTC: while waiting, when its `wait_timeout` ends the wait.
    pub wait_due_at: Option<String>,
    /// (v1.6) The latest progress its agent reported for the current dispatch.
    pub progress: Option<Progress>,
}

/// (v1.6) An agent's latest report of how far a dispatch has come.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub text: Option<String>,
    /// 0 to 1.
    pub fraction: Option<f32>,
    /// RFC 3339, UTC: when it was recorded.
    pub at: String,
}

/// Which work packages a listing shows. Empty fields match everything.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Filter {
    pub wp_id: Option<String>,
    pub status: Option<String>,
    pub lane: Option<String>,
    pub agent: Option<String>,
    /// wp_ids starting with this (a plan submitted with `--prefix`).
    pub prefix: Option<String>,
    /// The plan (v1.4): the work packages of this `plan`; those stored before plans were
    /// (migration 0008) by the rule ingest applies, their wp_id up to its last dot (`run1` holds
    /// `run1.spec`, not `run1.a.spec`). A trailing dot is ignored.
    pub plan: Option<String>,
    pub limit: Option<i64>,
}

impl Filter {
    fn plan_name(&self) -> Option<String> {
        let plan = self.plan.as_deref().filter(|p| !p.is_empty())?;
        Some(plan.strip_suffix('.').unwrap_or(plan).to_string())
    }

    /// Binds the filter as $1 to $6 of `matching!`; an empty value matches everything.
    fn bind<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let nonempty = |o: &Option<String>| o.clone().filter(|v| !v.is_empty());
        q.bind(nonempty(&self.wp_id))
            .bind(nonempty(&self.status))
            .bind(nonempty(&self.lane))
            .bind(nonempty(&self.agent))
            .bind(nonempty(&self.prefix))
            .bind(self.plan_name())
    }
}

/// Whether work package `w` matches a `Filter` bound as $1 to $6 (wp_id, status, lane, agent,
/// prefix, plan): one condition for the listing and its counts.
macro_rules! matching {
    () => {
        "($1::text IS NULL OR w.wp_id = $1)
           AND ($2::text IS NULL OR w.status = $2)
           AND ($3::text IS NULL OR w.lane = $3)
           AND ($4::text IS NULL OR w.agent_id = $4)
           AND ($5::text IS NULL OR starts_with(w.wp_id, $5))
           AND ($6::text IS NULL OR coalesce(w.plan, CASE WHEN strpos(w.wp_id, '.') > 0
                                     THEN left(w.wp_id, length(w.wp_id) - strpos(reverse(w.wp_id), '.')) END) = $6)"
    };
}

pub async fn counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    counts_matching(pool, &Filter::default()).await
}

/// Work packages per status among those matching `f` (its limit aside).
pub async fn counts_matching(pool: &PgPool, f: &Filter) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = f
        .bind(sqlx::query(concat!(
            "SELECT w.status, count(*) AS n FROM work_packages w WHERE ",
            matching!(),
            " GROUP BY w.status ORDER BY w.status"
        )))
        .fetch_all(pool)
        .await?;
    rows.iter().map(|r| Ok((r.try_get("status")?, r.try_get("n")?))).collect()
}

/// Bytes of the database the pool is connected to (v1.3).
pub async fn database_bytes(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_database_size(current_database())").fetch_one(pool).await
}

/// Work packages in stream order (one when `wp_id` is given, else at most `limit`).
pub async fn work_packages(pool: &PgPool, wp_id: Option<&str>, limit: i64) -> Result<Vec<WpView>, sqlx::Error> {
    list(pool, &Filter { wp_id: wp_id.map(str::to_string), limit: Some(limit), ..Default::default() }).await
}

/// Work packages matching `f`, in stream order (the most recent `limit` of them).
pub async fn list(pool: &PgPool, f: &Filter) -> Result<Vec<WpView>, sqlx::Error> {
    let rows = f
        .bind(sqlx::query(concat!(
            "SELECT w.wp_id, w.status, w.agent_id, w.lane, w.attempts, w.dispatch_id, w.wait_reason, w.last_error,
                to_char(w.next_attempt_at AT TIME ZONE 'UTC', 'HH24:MI:SS') AS next_at,
                (SELECT string_agg(d.depends_on || ' (' || coalesce(p.status, 'not submitted yet') || ')', ', ' ORDER BY d.depends_on)
                   FROM work_package_deps d LEFT JOIN work_packages p ON p.wp_id = d.depends_on
                  WHERE d.wp_id = w.wp_id AND p.status IS DISTINCT FROM 'completed') AS open_deps,
                (SELECT e.wp_id || ' (' || e.status || ')' FROM work_packages e
                  WHERE w.lane IS NOT NULL AND e.lane = w.lane
                    AND (e.source_ms, e.source_seq) < (w.source_ms, w.source_seq)
                    AND e.status NOT IN ('completed', 'cancelled')
                  ORDER BY e.source_ms DESC, e.source_seq DESC LIMIT 1) AS lane_pred,
                coalesce((SELECT array_agg(d.depends_on ORDER BY d.depends_on) FROM work_package_deps d WHERE d.wp_id = w.wp_id),
                         '{}') AS depends_on,
                w.work_type, w.route, w.source_id, w.source_ms, w.source_seq,
                to_char(w.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS updated,
                w.plan, w.priority, to_char(w.not_before AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS not_before,
                w.wait_for, w.wait_key, to_char(w.wait_due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS wait_due,
                w.on_timeout, pr.text AS progress_text, pr.fraction AS progress_fraction,
                to_char(pr.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS progress_at
         FROM work_packages w
         LEFT JOIN work_package_progress pr ON pr.wp_id = w.wp_id AND pr.dispatch_id = w.dispatch_id
         WHERE ",
            matching!(),
            "
         ORDER BY w.source_ms DESC, w.source_seq DESC
         LIMIT $7"
        )))
        .bind(f.limit.unwrap_or(200).clamp(1, 100_000))
        .fetch_all(pool)
        .await?;
    // Newest `limit` were fetched; show them oldest first, in lane order.
    let rows: Vec<_> = rows.into_iter().rev().collect();
    rows.iter()
        .map(|r| {
            let status: String = r.try_get("status")?;
            let open_deps: Option<String> = r.try_get("open_deps")?;
            let lane_pred: Option<String> = r.try_get("lane_pred")?;
            let wait_reason: Option<String> = r.try_get("wait_reason")?;
            let last_error: Option<String> = r.try_get("last_error")?;
            let next_at: Option<String> = r.try_get("next_at")?;
            let agent_id: Option<String> = r.try_get("agent_id")?;
            let lane: Option<String> = r.try_get("lane")?;
            let attempts: i32 = r.try_get("attempts")?;
            let mut why = Vec::new();
            match status.as_str() {
                "blocked" | "ready" | "retry_wait" => {
                    if let Some(d) = open_deps {
                        why.push(format!("waits for dependency {d}"));
                    }
                    if let (Some(p), Some(l)) = (lane_pred, &lane) {
                        why.push(format!("waits for lane {l} predecessor {p}"));
                    }
                    let delayed = wait_reason.as_deref().is_some_and(|w| w.starts_with("delayed:"));
                    if status == "retry_wait" && !delayed {
                        why.push(format!("attempt {} failed; retry at {} UTC", attempts, next_at.unwrap_or_default()));
                    } else if let Some(w) = wait_reason.filter(|_| why.is_empty()) {
                        why.push(w);
                    }
                }
                "dispatched" => {
                    why.push(format!("running on {}", agent_id.as_deref().unwrap_or("?")));
                    // A trigger Redis refused says so (see `dispatch::publish`).
                    why.extend(wait_reason);
                    // (v1.6) How far it has come, as its agent last said.
                    let text: Option<String> = r.try_get("progress_text")?;
                    let fraction: Option<f32> = r.try_get("progress_fraction")?;
                    match (fraction, text) {
                        (Some(f), Some(t)) => why.push(format!("progress {:.0}%: {t}", f * 100.0)),
                        (Some(f), None) => why.push(format!("progress {:.0}%", f * 100.0)),
                        (None, Some(t)) => why.push(format!("progress: {t}")),
                        (None, None) => {}
                    }
                }
                "waiting" => {
                    why.extend(wait_reason);
                    let due: Option<String> = r.try_get("wait_due")?;
                    let then: Option<String> = r.try_get("on_timeout")?;
                    if let Some(d) = due {
                        why.push(format!("until {d}, then {}", if then.as_deref() == Some("complete") { "completes" } else { "fails" }));
                    }
                }
                "failed" => why.push(format!(
                    "failed after {attempts} attempt(s): {}; retry or cancel it",
                    last_error.as_deref().unwrap_or("no error text")
                )),
                _ => {}
            }
            Ok(WpView {
                wp_id: r.try_get("wp_id")?,
                status,
                agent_id,
                lane,
                attempts,
                dispatch_id: r.try_get("dispatch_id")?,
                why: why.join("; "),
                work_type: r.try_get("work_type")?,
                route: r.try_get("route")?,
                depends_on: r.try_get("depends_on")?,
                source_id: r.try_get("source_id")?,
                updated_at: r.try_get("updated")?,
                plan: r.try_get("plan")?,
                priority: r.try_get("priority")?,
                not_before: r.try_get("not_before")?,
                wait_for: r.try_get("wait_for")?,
                wait_key: r.try_get("wait_key")?,
                wait_due_at: r.try_get("wait_due")?,
                progress: match r.try_get::<Option<String>, _>("progress_at")? {
                    Some(at) => Some(Progress { text: r.try_get("progress_text")?, fraction: r.try_get("progress_fraction")?, at }),
                    None => None,
                },
            })
        })
        .collect()
}

/// Work packages dispatched and not yet reported, per agent.
pub async fn in_flight(pool: &PgPool) -> Result<HashMap<String, u32>, sqlx::Error> {
    let rows = sqlx::query("SELECT agent_id, count(*)::int4 AS n FROM work_packages WHERE status = 'dispatched' GROUP BY agent_id")
        .fetch_all(pool)
        .await?;
    let mut out = HashMap::new();
    for r in rows {
        let agent: Option<String> = r.try_get("agent_id")?;
        let n: i32 = r.try_get("n")?;
        if let Some(a) = agent {
            out.insert(a, n.max(0) as u32);
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryEvent {
    /// RFC 3339, UTC.
    pub at: String,
    pub status: String,
    pub agent_id: Option<String>,
    pub dispatch_id: Option<String>,
    pub detail: Option<String>,
}

pub async fn history(pool: &PgPool, wp_id: &str) -> Result<Vec<HistoryEvent>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at, status, agent_id, dispatch_id, detail
         FROM work_package_events WHERE wp_id = $1 ORDER BY id",
    )
    .bind(wp_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(HistoryEvent {
                at: r.try_get("at")?,
                status: r.try_get("status")?,
                agent_id: r.try_get("agent_id")?,
                dispatch_id: r.try_get("dispatch_id")?,
                detail: r.try_get("detail")?,
            })
        })
        .collect()
}

/// What only the one-work-package view shows: its fields, result and last error.
#[derive(Debug, Clone, Serialize)]
pub struct WpDetail {
    pub fields: serde_json::Value,
    pub result: Option<String>,
    pub last_error: Option<String>,
    pub created_at: String,
}

pub async fn detail(pool: &PgPool, wp_id: &str) -> Result<Option<WpDetail>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT fields, result, last_error, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created
         FROM work_packages WHERE wp_id = $1",
    )
    .bind(wp_id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(WpDetail {
            fields: r.try_get("fields")?,
            result: r.try_get("result")?,
            last_error: r.try_get("last_error")?,
            created_at: r.try_get("created")?,
        })
    })
    .transpose()
}

/// Status of each of `ids` (absent: not ingested yet).
pub(crate) async fn statuses_of(pool: &PgPool, ids: &[String]) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let rows = sqlx::query("SELECT wp_id, status FROM work_packages WHERE wp_id = ANY($1)").bind(ids).fetch_all(pool).await?;
    rows.iter().map(|r| Ok((r.try_get("wp_id")?, r.try_get("status")?))).collect()
}

/// Whether PostgreSQL answers a trivial statement: the readiness probe's half.
pub(crate) async fn ping(pool: &PgPool) -> bool {
    matches!(sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool).await, Ok(1))
}
