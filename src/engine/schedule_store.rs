//! The tables of schedules (contract v1.6): `schedules`, one row per schedule, and
//! `schedule_firings`, one row per decided firing. The operators' changes (add, replace,
//! remove, pause, resume) and reads are here; the engine's decisions and publications are in
//! `engine::schedules`, which uses the firing statements below.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::core::plan::{self, Plan};
use crate::core::schedule::{self, MAX_PREFIX, Missed, Overlap, Timing};

/// The most schedules that may exist at once. Each is a series of the metrics and a row every
/// replica's round may lock; an operator defines them, so the cap is only a guard.
pub const MAX_SCHEDULES: i64 = 256;
/// The largest plan text a schedule holds.
pub const MAX_PLAN_BYTES: usize = 1024 * 1024;
/// The most work packages of a scheduled plan (all are published in one pipeline per firing).
pub const MAX_PLAN_WPS: usize = 1000;
/// Firings kept per schedule (beside its newest submitted one); older ones are removed.
const KEEP_FIRINGS: i64 = 100;
/// When a schedule's cron will never fire again.
fn never() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("9999-12-31T00:00:00Z").map(|d| d.with_timezone(&Utc)).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A schedule as an operator gives it, before it is checked.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub cron: String,
    #[serde(default = "utc")]
    pub timezone: String,
    /// The plan's YAML text.
    pub plan: String,
    /// Where the plan came from (a file name), for its errors; `plan` by default.
    #[serde(default)]
    pub plan_source: Option<String>,
    /// `skip` (the default) or `catch_up:N`.
    #[serde(default = "skip")]
    pub missed: String,
    /// `skip` (the default) or `start`.
    #[serde(default = "skip")]
    pub overlap: String,
    #[serde(default)]
    pub paused: bool,
}

fn utc() -> String {
    "UTC".into()
}
fn skip() -> String {
    "skip".into()
}

/// Why a definition was refused: a sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Invalid(String),
    #[error("schedule {0} exists; replace it instead")]
    Exists(String),
    #[error("there are {MAX_SCHEDULES} schedules already, the most there may be")]
    TooMany,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A checked definition.
pub(crate) struct Checked {
    timing: Timing,
    plan_source: String,
}

impl Definition {
    /// Checks everything a firing will need: name, cron, time zone, policies and the plan,
    /// whose errors name the file, line and column.
    pub(crate) fn check(&self, name: &str) -> Result<Checked, Refused> {
        let invalid = |e: &dyn std::fmt::Display| Refused::Invalid(e.to_string());
        schedule::check_name(name).map_err(|e| invalid(&e))?;
        let timing = Timing::parse(&self.cron, &self.timezone).map_err(|e| invalid(&e))?;
        self.missed.parse::<Missed>().map_err(|e| invalid(&e))?;
        self.overlap.parse::<Overlap>().map_err(|e| invalid(&e))?;
        let plan_source = self.plan_source.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "plan".into());
        if self.plan.len() > MAX_PLAN_BYTES {
            return Err(Refused::Invalid(format!("{plan_source}: the plan is over {MAX_PLAN_BYTES} bytes")));
        }
        let parsed = plan::parse(&self.plan, &plan_source, MAX_PREFIX).map_err(|e| invalid(&e))?;
        if parsed.work_packages.len() > MAX_PLAN_WPS {
            return Err(Refused::Invalid(format!("{plan_source}: a scheduled plan has at most {MAX_PLAN_WPS} work packages")));
        }
        Ok(Checked { timing, plan_source })
    }
}

/// A schedule as operators see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScheduleView {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub plan_source: String,
    pub missed: String,
    pub overlap: String,
    pub paused: bool,
    /// None while paused.
    pub next_firing: Option<DateTime<Utc>>,
    pub last_firing: Option<DateTime<Utc>>,
    /// `submitted` or `skipped_overlap`, of the last firing.
    pub last_outcome: Option<String>,
    /// The prefix of the last submitted firing's wp_ids (its plan is this without the dot).
    pub last_prefix: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// Every schedule, by name.
pub async fn list<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<Vec<ScheduleView>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT s.name, s.cron, s.timezone, s.plan_source, s.missed, s.overlap, s.paused, s.next_fire_at, s.updated_at,
                l.fire_at, l.outcome,
                (SELECT f.prefix FROM schedule_firings f WHERE f.schedule = s.name AND f.outcome = 'submitted'
                 ORDER BY f.fire_at DESC LIMIT 1) AS last_prefix
         FROM schedules s
         LEFT JOIN LATERAL (SELECT fire_at, outcome FROM schedule_firings f WHERE f.schedule = s.name
                            ORDER BY fire_at DESC LIMIT 1) l ON true
         ORDER BY s.name",
    )
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            let paused: bool = r.try_get("paused")?;
            let next: DateTime<Utc> = r.try_get("next_fire_at")?;
            Ok(ScheduleView {
                name: r.try_get("name")?,
                cron: r.try_get("cron")?,
                timezone: r.try_get("timezone")?,
                plan_source: r.try_get("plan_source")?,
                missed: r.try_get("missed")?,
                overlap: r.try_get("overlap")?,
                paused,
                next_firing: (!paused && next < never()).then_some(next),
                last_firing: r.try_get("fire_at")?,
                last_outcome: r.try_get("outcome")?,
                last_prefix: r.try_get("last_prefix")?,
                updated_at: r.try_get("updated_at")?,
            })
        })
        .collect()
}

/// The first firing after the database's now.
async fn next_from_now(tx: &mut Transaction<'_, Postgres>, timing: &Timing) -> Result<DateTime<Utc>, sqlx::Error> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&mut **tx).await?;
    Ok(timing.next_after(now).unwrap_or_else(never))
}

/// Adds a schedule, or (`replace`) replaces the one of that name; true when it replaced one.
/// A replaced schedule starts afresh: its next firing is the first after now.
pub async fn put(pool: &PgPool, name: &str, def: &Definition, replace: bool) -> Result<bool, Refused> {
    let checked = def.check(name)?;
    let mut tx = pool.begin().await?;
    // Serialises adds, so the cap holds; operators' changes are rare.
    sqlx::query("LOCK TABLE schedules IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM schedules WHERE name = $1)").bind(name).fetch_one(&mut *tx).await?;
    if exists && !replace {
        return Err(Refused::Exists(name.to_string()));
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM schedules").fetch_one(&mut *tx).await?;
    if !exists && count >= MAX_SCHEDULES {
        return Err(Refused::TooMany);
    }
    let next = next_from_now(&mut tx, &checked.timing).await?;
    sqlx::query(
        "INSERT INTO schedules (name, cron, timezone, plan, plan_source, missed, overlap, paused, next_fire_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (name) DO UPDATE SET cron = $2, timezone = $3, plan = $4, plan_source = $5, missed = $6, overlap = $7,
             paused = $8, next_fire_at = $9, updated_at = now()",
    )
    .bind(name)
    .bind(&def.cron)
    .bind(&def.timezone)
    .bind(&def.plan)
    .bind(&checked.plan_source)
    .bind(def.missed.parse::<Missed>().map(|m| m.to_string()).unwrap_or_default())
    .bind(&def.overlap)
    .bind(def.paused)
    .bind(next)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(exists)
}

/// Removes a schedule; false when there was none. Its firings already decided are still
/// published; no new one is decided.
pub async fn remove(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM schedules WHERE name = $1").bind(name).execute(pool).await?.rows_affected() > 0)
}

/// Pauses (`true`) or resumes a schedule; None when there is no such schedule. A resumed
/// schedule fires next at its first firing after now: what came due while it was paused is
/// not caught up.
pub async fn set_paused(pool: &PgPool, name: &str, paused: bool) -> Result<Option<ScheduleView>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row =
        sqlx::query("SELECT cron, timezone, paused FROM schedules WHERE name = $1 FOR UPDATE").bind(name).fetch_optional(&mut *tx).await?;
    let Some(row) = row else { return Ok(None) };
    let was: bool = row.try_get("paused")?;
    if was != paused {
        if paused {
            sqlx::query("UPDATE schedules SET paused = true, updated_at = now() WHERE name = $1").bind(name).execute(&mut *tx).await?;
        } else {
            let timing = Timing::parse(&row.try_get::<String, _>("cron")?, &row.try_get::<String, _>("timezone")?)
                .map_err(|e| sqlx::Error::Protocol(format!("schedule {name}: {e}")))?;
            let next = next_from_now(&mut tx, &timing).await?;
            sqlx::query("UPDATE schedules SET paused = false, next_fire_at = $2, updated_at = now() WHERE name = $1")
                .bind(name)
                .bind(next)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(list(pool).await?.into_iter().find(|s| s.name == name))
}

/// An incoming entry's fields, in order.
pub(crate) type Entry = Vec<(String, String)>;

/// A due schedule, locked by the round that decides it.
pub(crate) struct DueSchedule {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub plan: String,
    pub plan_source: String,
    pub missed: String,
    pub overlap: String,
    pub next_fire_at: DateTime<Utc>,
    /// The database's now, the clock of every replica's decisions.
    pub now: DateTime<Utc>,
}

impl DueSchedule {
    /// The plan, prefixed for the firing at `fire_at`, and its entries. Each entry also names
    /// its plan (the prefix without its dot), its schedule and the firing's time, unless the
    /// plan sets those fields itself.
    pub(crate) fn entries(&self, prefix: &str, fire_at: DateTime<Utc>) -> Result<(Vec<String>, Vec<Entry>), String> {
        let plan: Plan = plan::parse(&self.plan, &self.plan_source, MAX_PREFIX).map_err(|e| e.to_string())?.with_prefix(prefix);
        let extra = [
            ("plan", prefix.trim_end_matches('.').to_string()),
            ("schedule", self.name.clone()),
            ("scheduled_for", fire_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        ];
        let entries = plan
            .entries()
            .into_iter()
            .map(|mut fields| {
                for (k, v) in &extra {
                    if !fields.iter().any(|(f, _)| f == k) {
                        fields.push((k.to_string(), v.clone()));
                    }
                }
                fields
            })
            .collect();
        Ok((plan.wp_ids(), entries))
    }
}

/// Up to `limit` schedules whose next firing has come, locked; those another replica holds
/// are skipped, so no replica waits for another.
pub(crate) async fn lock_due(tx: &mut Transaction<'_, Postgres>, limit: i64) -> Result<Vec<DueSchedule>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT name, cron, timezone, plan, plan_source, missed, overlap, next_fire_at, now() AS now FROM schedules
         WHERE NOT paused AND next_fire_at <= now() ORDER BY next_fire_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DueSchedule {
                name: r.try_get("name")?,
                cron: r.try_get("cron")?,
                timezone: r.try_get("timezone")?,
                plan: r.try_get("plan")?,
                plan_source: r.try_get("plan_source")?,
                missed: r.try_get("missed")?,
                overlap: r.try_get("overlap")?,
                next_fire_at: r.try_get("next_fire_at")?,
                now: r.try_get("now")?,
            })
        })
        .collect()
}

pub(crate) async fn set_next(tx: &mut Transaction<'_, Postgres>, name: &str, next: Option<DateTime<Utc>>) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE schedules SET next_fire_at = $2 WHERE name = $1")
        .bind(name)
        .bind(next.unwrap_or_else(never))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Whether the schedule's newest submitted firing still has open work: a work package that is
/// blocked, ready, dispatched or waiting to retry, or one not stored yet while the firing is
/// less than a minute old (its entries may still be on their way; an entry dead-lettered
/// stops counting after that minute). Failed, completed and cancelled work is finished.
pub(crate) async fn previous_open(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "WITH last AS (SELECT wp_ids, decided_at FROM schedule_firings WHERE schedule = $1 AND outcome = 'submitted'
                       ORDER BY fire_at DESC LIMIT 1)
         SELECT EXISTS (
             SELECT 1 FROM last, unnest(last.wp_ids) AS id LEFT JOIN work_packages w ON w.wp_id = id
             WHERE w.status IN ('blocked', 'ready', 'dispatched', 'retry_wait')
                OR (w.wp_id IS NULL AND last.decided_at > now() - interval '1 minute'))",
    )
    .bind(name)
    .fetch_one(&mut **tx)
    .await
}

/// Records a decided firing; false when it was recorded already (it never is: the schedule's
/// lock and `next_fire_at` decide each firing once; the key makes sure of it).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record_firing(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
    fire_at: DateTime<Utc>,
    outcome: &str,
    prefix: &str,
    wp_ids: &[String],
    entries: &[Vec<(String, String)>],
    decided_by: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO schedule_firings (schedule, fire_at, outcome, prefix, wp_ids, entries, decided_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(fire_at)
    .bind(outcome)
    .bind(prefix)
    .bind(wp_ids)
    .bind(sqlx::types::Json(entries))
    .bind(decided_by)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A submitted firing whose entries Redis has not confirmed yet.
pub(crate) struct Unpublished {
    pub schedule: String,
    pub fire_at: DateTime<Utc>,
    pub entries: Vec<Vec<(String, String)>>,
}

/// Up to `limit` unpublished firings, locked, oldest first: this replica's own at once, any
/// other replica's once it has been left for `stale` (that replica died or stalled between its
/// decision and its publication).
pub(crate) async fn lock_unpublished(
    tx: &mut Transaction<'_, Postgres>,
    me: &str,
    stale: std::time::Duration,
    limit: i64,
) -> Result<Vec<Unpublished>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT schedule, fire_at, entries FROM schedule_firings
         WHERE published_at IS NULL AND outcome = 'submitted'
           AND (decided_by = $1 OR decided_at < now() - make_interval(secs => $2::float8))
         ORDER BY decided_at, fire_at LIMIT $3 FOR UPDATE SKIP LOCKED",
    )
    .bind(me)
    .bind(stale.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| {
            let entries: sqlx::types::Json<Vec<Vec<(String, String)>>> = r.try_get("entries")?;
            Ok(Unpublished { schedule: r.try_get("schedule")?, fire_at: r.try_get("fire_at")?, entries: entries.0 })
        })
        .collect()
}

pub(crate) async fn mark_published(tx: &mut Transaction<'_, Postgres>, schedule: &str, fire_at: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE schedule_firings SET published_at = now() WHERE schedule = $1 AND fire_at = $2")
        .bind(schedule)
        .bind(fire_at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Removes finished firings beyond the newest `KEEP_FIRINGS` of each schedule (always keeping
/// its newest submitted one, which the overlap policy reads), and those of removed schedules.
pub async fn prune(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM schedule_firings f
         WHERE (f.published_at IS NOT NULL OR f.outcome <> 'submitted')
           AND (NOT EXISTS (SELECT 1 FROM schedules s WHERE s.name = f.schedule)
                OR (f.fire_at IS DISTINCT FROM (SELECT max(g.fire_at) FROM schedule_firings g
                                                WHERE g.schedule = f.schedule AND g.outcome = 'submitted')
                    AND f.fire_at < (SELECT g.fire_at FROM schedule_firings g WHERE g.schedule = f.schedule
                                     ORDER BY g.fire_at DESC OFFSET $1 LIMIT 1)))",
    )
    .bind(KEEP_FIRINGS - 1)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
