//! The claim: under the locks of the agents it may give work to, count them exactly, record
//! why the rest waits, claim what goes (status `dispatched`, attempt + 1, a new `dispatch_id`)
//! with its outbox row, and take the rate-limit tokens it used.

use std::collections::HashMap;

use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use super::candidates::{lane_head, may_run_checked};
use super::decide::{AgentsNow, Claim, Wait};
use crate::core::routing_file::RoutingTable;
use crate::engine::budgets;
use crate::engine::controls::{self, Bucket, Pause, Paused};

/// Namespace of the per-agent locks (`pg_advisory_xact_lock(AGENT_LOCKS, hashtext(agent))`).
pub(super) const AGENT_LOCKS: i32 = 0x6765;

/// Takes the locks of `agents` (in name order, so two rounds cannot deadlock). Only agents
/// with a cap or a rate limit are locked: other agents' rounds never queue on them.
pub(super) async fn lock(tx: &mut Transaction<'_, Postgres>, agents: &[String]) -> Result<(), sqlx::Error> {
    if agents.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT count(pg_advisory_xact_lock($1, hashtext(s.a))) FROM (SELECT a FROM unnest($2::text[]) AS a ORDER BY a) s")
        .bind(AGENT_LOCKS)
        .bind(agents)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The agents' state in one statement: work in flight, folded from the deltas the triggers of
/// migration 0003 keep for the `locked` agents (exact: no other round folds or claims for them
/// now) and summed as they are for the others (which only balances load or decides which
/// targets a round reads); the pauses; the rate-limit buckets, refilled to the database's clock.
/// Also returns that clock, which the tokens taken are written at.
pub(super) async fn agents_now<'e>(
    db: impl sqlx::PgExecutor<'e>,
    routing: &RoutingTable,
    locked: &[String],
) -> Result<(AgentsNow, f64), sqlx::Error> {
    let rows = sqlx::query(
        "WITH folded AS (DELETE FROM agent_in_flight WHERE agent_id = ANY($1) RETURNING agent_id, n),
              sums AS (SELECT agent_id, sum(n)::int4 AS n FROM folded GROUP BY agent_id),
              kept AS (INSERT INTO agent_in_flight (agent_id, n) SELECT agent_id, n FROM sums WHERE n <> 0)
         SELECT 'flight' AS k, agent_id AS name, n::float8 AS a, NULL::float8 AS b, NULL::text AS scope, NULL::text AS reason,
                NULL::timestamptz AS at FROM sums WHERE n > 0
         UNION ALL
         SELECT 'flight', agent_id, sum(n)::float8, NULL, NULL, NULL, NULL FROM agent_in_flight
          WHERE NOT agent_id = ANY($1) GROUP BY agent_id HAVING sum(n) > 0
         UNION ALL
         SELECT 'pause', name, NULL, NULL, scope, reason, paused_at FROM dispatch_pauses
         UNION ALL
         SELECT 'bucket', agent_id, tokens, at, NULL, NULL, NULL FROM agent_rate_buckets
         UNION ALL
         SELECT 'clock', '', extract(epoch FROM clock_timestamp())::float8, NULL, NULL, NULL, NULL",
    )
    .bind(locked)
    .fetch_all(db)
    .await?;
    let mut now = 0.0;
    let mut agents = AgentsNow::default();
    let mut pauses = Vec::new();
    let mut stored: HashMap<String, (f64, f64)> = HashMap::new();
    for r in &rows {
        let name: String = r.try_get("name")?;
        match r.try_get::<String, _>("k")?.as_str() {
            "flight" => {
                agents.in_flight.insert(name, r.try_get::<f64, _>("a")?.max(0.0) as u32);
            }
            "pause" => pauses.push(pause_of(r, name)?),
            "bucket" => {
                stored.insert(name, (r.try_get("a")?, r.try_get("b")?));
            }
            _ => now = r.try_get("a")?,
        }
    }
    agents.paused = Paused::of(pauses);
    for (name, spec) in &routing.agents {
        let Some(limit) = spec.rate_limit else { continue };
        let burst = f64::from(limit.burst);
        let tokens = match stored.get(name) {
            Some((t, at)) => (t + (now - at).max(0.0) * limit.per_second()).min(burst),
            None => burst,
        };
        agents.buckets.insert(name.clone(), Bucket { limit, tokens });
    }
    Ok((agents, now))
}

fn pause_of(r: &PgRow, name: String) -> Result<Pause, sqlx::Error> {
    Ok(Pause { scope: r.try_get("scope")?, name, reason: r.try_get("reason")?, paused_at: r.try_get("at")? })
}

/// Records why each waiting work package waits, only where that changed: a work package that
/// waits for the same reason as last round is not written again. Rows are found key by key
/// (see `candidates`).
pub(super) async fn record_waits(tx: &mut Transaction<'_, Postgres>, waits: &[Wait], routed_by: &str) -> Result<(), sqlx::Error> {
    if waits.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&Wait) -> Option<String>| waits.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "WITH locked AS MATERIALIZED (
             SELECT w.wp_id, c.reason, c.status, c.due, c.held_by, c.target
             FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::text[])
                  AS c(wp_id, reason, status, due, held_by, target)
             CROSS JOIN LATERAL (SELECT * FROM work_packages x WHERE x.wp_id = c.wp_id OFFSET 0) w
             WHERE w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait')
               AND (w.status <> c.status OR w.wait_reason IS DISTINCT FROM c.reason OR w.held_by IS DISTINCT FROM c.held_by
                    OR (c.target IS NOT NULL AND w.target IS DISTINCT FROM c.target))
             FOR UPDATE OF w SKIP LOCKED)
         UPDATE work_packages w SET status = l.status, wait_reason = l.reason, updated_at = now(), held_by = l.held_by,
                ready_at = CASE WHEN l.status = 'ready' THEN coalesce(w.ready_at, now()) ELSE w.ready_at END,
                next_attempt_at = CASE WHEN l.due IS NOT NULL THEN to_timestamp(l.due) ELSE w.next_attempt_at END,
                target = coalesce(l.target, w.target), routed_by = CASE WHEN l.target IS NOT NULL THEN $7 ELSE w.routed_by END
         FROM locked l WHERE w.wp_id = l.wp_id",
    )
    .bind(col(|w| Some(w.wp_id.clone())))
    .bind(col(|w| Some(w.reason.clone())))
    .bind(col(|w| Some(w.status.as_str().to_string())))
    .bind(waits.iter().map(|w| w.due).collect::<Vec<_>>())
    .bind(col(|w| w.held_by.clone()))
    .bind(col(|w| w.target.clone()))
    .bind(routed_by)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Claims the work packages that may still go when their rows are locked (skipping rows
/// another round holds; not paused; their plan's and agent's budgets not reached), and writes
/// their outbox rows in the same statement. The rows are found by key (a LATERAL lookup that
/// `OFFSET 0` keeps from being flattened), locked and checked in one step, and updated by the
/// row versions locked (`ctid`, a TID scan): each plan is a loop over the batch, whatever the
/// statistics say. (Before, a plan cached while the table was small walked the whole table
/// twice per batch, once to find the rows and once to update them, and once more per row for
/// `upstream_of!`: 100 ms for 60 rows of 1,400, growing with the table; `BENCHMARKS.md`.)
pub(super) async fn claim(tx: &mut Transaction<'_, Postgres>, claims: &[Claim], routing: &RoutingTable) -> Result<Vec<PgRow>, sqlx::Error> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let routed_by = routing.config_version.as_str();
    let (budgeted, limits, periods) = budgets::agent_budget_columns(routing);
    let claim_sql = concat!(
        "WITH locked AS MATERIALIZED (
             SELECT w.ctid AS tid, w.wp_id, c.agent, c.route, c.timeout_ms, c.target
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[]) AS c(wp_id, agent, route, timeout_ms, target)
             CROSS JOIN LATERAL (SELECT x.ctid, x.* FROM work_packages x WHERE x.wp_id = c.wp_id OFFSET 0) w
             WHERE w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait') AND ",
        may_run_checked!(),
        "
               AND NOT EXISTS (SELECT 1 FROM dispatch_pauses p
                               WHERE (p.scope = 'agent' AND p.name = c.agent) OR (p.scope = 'lane' AND p.name = w.lane)
                                  OR (p.scope = 'plan' AND p.name = w.plan))
               AND NOT EXISTS (SELECT 1 FROM plan_budgets b WHERE b.plan = w.plan AND b.limit_usd <=
                               (SELECT coalesce(sum(s.cost), 0) FROM spend_totals s WHERE s.scope = 'plan' AND s.name = b.plan))
               AND NOT EXISTS (SELECT 1 FROM unnest($7::text[], $8::text[], $9::text[]) AS g(agent, lim, period)
                               WHERE g.agent = c.agent AND g.lim::numeric <=
                               (SELECT coalesce(sum(s.cost), 0) FROM spend_totals s
                                WHERE s.scope = 'agent' AND s.name = g.agent AND s.day >= ",
        budgets::period_start!("g.period"),
        "))
             FOR UPDATE OF w SKIP LOCKED),
         claimed AS (
             UPDATE work_packages w SET status = 'dispatched', agent_id = l.agent, route = l.route,
                    attempts = w.attempts + 1, dispatch_id = w.wp_id || ':' || (w.attempts + 1),
                    dispatched_at = now(), wait_reason = NULL, next_attempt_at = NULL, held_by = NULL,
                    target = l.target, routed_by = $6,
                    updated_at = now(), timeout_ms = l.timeout_ms,
                    deadline_at = now() + make_interval(secs => l.timeout_ms / 1000.0)
             FROM locked l WHERE w.ctid = l.tid AND w.wp_id = l.wp_id
             RETURNING w.wp_id, w.agent_id, w.route, w.attempts, w.dispatch_id, w.fields, w.source_id, w.dispatched_at, ",
        super::publish::upstream_of!(),
        "),
         outbox AS (INSERT INTO dispatch_outbox (dispatch_id, wp_id) SELECT dispatch_id, wp_id FROM claimed)
         SELECT * FROM claimed"
    );
    sqlx::query(claim_sql)
        .bind(claims.iter().map(|c| c.wp_id.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.agent.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.kind.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.timeout_ms).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.target.as_str()).collect::<Vec<_>>())
        .bind(routed_by)
        .bind(&budgeted)
        .bind(&limits)
        .bind(&periods)
        .fetch_all(&mut **tx)
        .await
}

/// (v1.6) Puts the work packages that wait for an approval or an event, and may go when their
/// rows are locked, into `waiting`, with the due time of their timeout. Returns those with an
/// event key: an event kept for the key may be waiting for them.
pub(super) async fn enter_waiting(tx: &mut Transaction<'_, Postgres>, wp_ids: &[String]) -> Result<Vec<String>, sqlx::Error> {
    if wp_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = concat!(
        "WITH locked AS MATERIALIZED (
             SELECT w.wp_id FROM unnest($1::text[]) AS c(wp_id)
             JOIN work_packages w ON w.wp_id = c.wp_id
             WHERE w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait') AND w.wait_for IS NOT NULL
               AND (w.status <> 'retry_wait' OR w.next_attempt_at <= now()) AND (w.not_before IS NULL OR w.not_before <= now())
               AND ",
        may_run_checked!(),
        "
             FOR UPDATE OF w SKIP LOCKED)
         UPDATE work_packages w SET status = 'waiting', wait_reason = ",
        crate::engine::store::waiting_reason!("w.wait_for", "w.wait_key"),
        ", next_attempt_at = NULL, held_by = NULL, updated_at = now(),
                wait_due_at = now() + make_interval(secs => w.wait_timeout_ms / 1000.0)
         FROM locked l WHERE w.wp_id = l.wp_id
         RETURNING w.wp_id, w.wait_key"
    );
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(sql).bind(wp_ids).fetch_all(&mut **tx).await?;
    Ok(rows.into_iter().filter(|(_, k)| k.is_some()).map(|(w, _)| w).collect())
}

/// Takes a token from each rate-limited agent for every work package claimed for it: for
/// what was claimed, not for what the round meant to claim.
pub(super) async fn take_tokens(
    tx: &mut Transaction<'_, Postgres>,
    before: &HashMap<String, Bucket>,
    claimed: &[PgRow],
    now: f64,
) -> Result<(), sqlx::Error> {
    if before.is_empty() {
        return Ok(());
    }
    let mut used: HashMap<String, u32> = HashMap::new();
    for r in claimed {
        *used.entry(r.try_get("agent_id")?).or_insert(0) += 1;
    }
    controls::take_tokens(tx, before, &used, now).await
}
