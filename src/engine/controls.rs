//! The operators' dispatch controls that live in PostgreSQL (contract v1.4): pauses of agents,
//! lanes and plans (table `dispatch_pauses`), and the token buckets of agents with a
//! `rate_limit` (table `agent_rate_buckets`). Priorities, fair share and delayed work are
//! columns of the work package and are decided in `dispatch`.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::core::routing_file::RateLimit;

/// What a pause applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PauseScope {
    Agent,
    Lane,
    Plan,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown pause scope {0:?}: use agent, lane or plan")]
pub struct UnknownScope(pub String);

impl PauseScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            PauseScope::Agent => "agent",
            PauseScope::Lane => "lane",
            PauseScope::Plan => "plan",
        }
    }
}

impl std::str::FromStr for PauseScope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Self, UnknownScope> {
        match s {
            "agent" => Ok(PauseScope::Agent),
            "lane" => Ok(PauseScope::Lane),
            "plan" => Ok(PauseScope::Plan),
            other => Err(UnknownScope(crate::core::entry::excerpt(other))),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Pause {
    pub scope: String,
    pub name: String,
    pub reason: Option<String>,
    pub paused_at: chrono::DateTime<chrono::Utc>,
}

impl Pause {
    fn from_row(r: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Pause { scope: r.try_get("scope")?, name: r.try_get("name")?, reason: r.try_get("reason")?, paused_at: r.try_get("paused_at")? })
    }

    /// Why work waits for it: `paused: agent ada (reason)`.
    pub(crate) fn wait_reason(&self) -> String {
        match &self.reason {
            Some(r) => format!("paused: {} {} ({r})", self.scope, self.name),
            None => format!("paused: {} {}", self.scope, self.name),
        }
    }
}

/// Every pause, oldest first.
pub async fn pauses<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<Vec<Pause>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT scope, name, reason, paused_at FROM dispatch_pauses ORDER BY paused_at, scope, name").fetch_all(db).await?;
    rows.iter().map(Pause::from_row).collect()
}

/// Pauses `name`; pausing what is paused already keeps (and returns) the first pause.
pub async fn pause(pool: &PgPool, scope: PauseScope, name: &str, reason: Option<&str>) -> Result<Pause, sqlx::Error> {
    let row = sqlx::query(
        "WITH new AS (INSERT INTO dispatch_pauses (scope, name, reason) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING
                      RETURNING scope, name, reason, paused_at)
         SELECT * FROM new UNION ALL SELECT scope, name, reason, paused_at FROM dispatch_pauses WHERE scope = $1 AND name = $2
         LIMIT 1",
    )
    .bind(scope.as_str())
    .bind(name)
    .bind(reason.filter(|r| !r.is_empty()))
    .fetch_one(pool)
    .await?;
    Pause::from_row(&row)
}

/// Ends a pause; None when `name` was not paused. The work a plan's or lane's pause held back
/// row by row (`held_by`) goes back to the ready work that rounds read, in the same
/// transaction, so that no round sees the pause gone and the work still held.
pub async fn resume(pool: &PgPool, scope: PauseScope, name: &str) -> Result<Option<Pause>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query("DELETE FROM dispatch_pauses WHERE scope = $1 AND name = $2 RETURNING scope, name, reason, paused_at")
        .bind(scope.as_str())
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    if row.is_some() && scope != PauseScope::Agent {
        sqlx::query("UPDATE work_packages SET held_by = NULL WHERE held_by = $1")
            .bind(format!("{}:{name}", scope.as_str()))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    row.as_ref().map(Pause::from_row).transpose()
}

/// The pauses a dispatch round applies, by scope and name.
#[derive(Debug, Default)]
pub(crate) struct Paused(HashMap<(PauseScope, String), Pause>);

impl Paused {
    pub(crate) fn of(pauses: Vec<Pause>) -> Self {
        Paused(pauses.into_iter().filter_map(|p| Some(((p.scope.parse().ok()?, p.name.clone()), p))).collect())
    }

    pub(crate) fn get(&self, scope: PauseScope, name: Option<&str>) -> Option<&Pause> {
        if self.0.is_empty() {
            return None;
        }
        self.0.get(&(scope, name?.to_string()))
    }
}

/// An agent's token bucket as a round found it, refilled to the database's clock of the moment.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    pub limit: RateLimit,
    pub tokens: f64,
}

impl Bucket {
    /// Why the agent takes no work now, if it has no token.
    pub(crate) fn held(&self, agent: &str) -> Option<String> {
        (self.tokens < 1.0).then(|| {
            let secs = ((1.0 - self.tokens) / self.limit.per_second()).ceil().max(1.0);
            format!("rate limit of {agent}: next slot in {secs} s")
        })
    }
}

/// Takes `used` tokens from each bucket, as of `now` (the database's clock the buckets were
/// refilled to, see `dispatch::claim::agents_now`).
pub(crate) async fn take_tokens(
    tx: &mut Transaction<'_, Postgres>,
    buckets: &HashMap<String, Bucket>,
    used: &HashMap<String, u32>,
    now: f64,
) -> Result<(), sqlx::Error> {
    let (agents, tokens): (Vec<&str>, Vec<f64>) =
        used.iter().filter(|(_, n)| **n > 0).filter_map(|(a, n)| Some((a.as_str(), buckets.get(a)?.tokens - f64::from(*n)))).unzip();
    if agents.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO agent_rate_buckets (agent_id, tokens, at) SELECT a, t, $3 FROM unnest($1::text[], $2::float8[]) AS k(a, t)
         ON CONFLICT (agent_id) DO UPDATE SET tokens = excluded.tokens, at = excluded.at",
    )
    .bind(&agents)
    .bind(&tokens)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
