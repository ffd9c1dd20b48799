//! What `status` shows: counts per status, and for each work package why it waits.

use serde::Serialize;
use sqlx::{PgPool, Row};

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
}

#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    pub counts: Vec<(String, i64)>,
    pub work_packages: Vec<WpView>,
    pub deadletters: Option<u64>,
}

pub async fn counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query("SELECT status, count(*) AS n FROM work_packages GROUP BY status ORDER BY status").fetch_all(pool).await?;
    rows.iter().map(|r| Ok((r.try_get("status")?, r.try_get("n")?))).collect()
}

/// Work packages in stream order (one when `wp_id` is given, else at most `limit`).
pub async fn work_packages(pool: &PgPool, wp_id: Option<&str>, limit: i64) -> Result<Vec<WpView>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT w.wp_id, w.status, w.agent_id, w.lane, w.attempts, w.dispatch_id, w.wait_reason, w.last_error,
                to_char(w.next_attempt_at AT TIME ZONE 'UTC', 'HH24:MI:SS') AS next_at,
                (SELECT string_agg(d.depends_on || ' (' || coalesce(p.status, 'not submitted yet') || ')', ', ' ORDER BY d.depends_on)
                   FROM work_package_deps d LEFT JOIN work_packages p ON p.wp_id = d.depends_on
                  WHERE d.wp_id = w.wp_id AND p.status IS DISTINCT FROM 'completed') AS open_deps,
                (SELECT e.wp_id || ' (' || e.status || ')' FROM work_packages e
                  WHERE w.lane IS NOT NULL AND e.lane = w.lane
                    AND (e.source_ms, e.source_seq) < (w.source_ms, w.source_seq)
                    AND e.status NOT IN ('completed', 'cancelled')
                  ORDER BY e.source_ms DESC, e.source_seq DESC LIMIT 1) AS lane_pred
         FROM work_packages w
         WHERE ($1::text IS NULL OR w.wp_id = $1)
         ORDER BY w.source_ms, w.source_seq
         LIMIT $2",
    )
    .bind(wp_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
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
                    if status == "retry_wait" {
                        why.push(format!("attempt {} failed; retry at {} UTC", attempts, next_at.unwrap_or_default()));
                    } else if let Some(w) = wait_reason.filter(|_| why.is_empty()) {
                        why.push(w);
                    }
                }
                "dispatched" => why.push(format!("running on {}", agent_id.as_deref().unwrap_or("?"))),
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
            })
        })
        .collect()
}

pub fn render(o: &Overview) -> String {
    let mut out = String::new();
    let counts: Vec<String> = o.counts.iter().map(|(s, n)| format!("{s}={n}")).collect();
    out.push_str(&format!("work packages: {}\n", if counts.is_empty() { "none".into() } else { counts.join("  ") }));
    if let Some(d) = o.deadletters {
        out.push_str(&format!("dead letters: {d}\n"));
    }
    if !o.work_packages.is_empty() {
        let w = o.work_packages.iter().map(|v| v.wp_id.len()).max().unwrap_or(5).max(5);
        out.push_str(&format!("\n{:<w$}  {:<10}  {:<10}  {:<10}  {}\n", "WP", "STATUS", "AGENT", "LANE", "WHY"));
        for v in &o.work_packages {
            out.push_str(&format!(
                "{:<w$}  {:<10}  {:<10}  {:<10}  {}\n",
                v.wp_id,
                v.status,
                v.agent_id.as_deref().unwrap_or("-"),
                v.lane.as_deref().unwrap_or("-"),
                v.why
            ));
        }
    }
    out
}
