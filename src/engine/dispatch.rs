//! Dispatch: choose which held work packages may go now, claim them in PostgreSQL, then
//! publish their triggers to Redis.
//!
//! Exactly-once rests on two things. The claim (status `dispatched`, attempt + 1, a new
//! `dispatch_id`) is one UPDATE of rows it locks first, skipping rows another round holds, so
//! only one round can claim a given attempt. Publication is a Redis script that adds the
//! trigger only if its `dispatch_id` key is new, so publishing a claimed dispatch again (after a
//! crash, or by a replica that was paused) is harmless. A claim whose publication was not
//! confirmed is published again by the scheduler.
//!
//! Rounds run side by side on every replica. Only an agent with a `max_in_flight` needs an
//! exact count of its work in flight: a round that may give work to such an agent takes that
//! agent's lock, and counts it under the lock; other agents' counts only balance the load and
//! are read as they are.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use anyhow::Context;
use sqlx::Row;

use crate::core::entry::parse_stream_id;
use crate::core::router::{self, AgentState, Decision, RouteRequest};
use crate::core::routing_file::{RateLimit, RoutingTable};
use crate::engine::context::{Ctx, Stats};
use crate::engine::controls::{self, Bucket, PauseScope, Paused};
use crate::engine::streams::{self, Trigger};

/// Namespace of the per-agent locks (`pg_advisory_xact_lock(AGENT_LOCKS, hashtext(agent))`).
const AGENT_LOCKS: i32 = 0x6765;
const ROUND_LIMIT: i64 = 1000;

/// Which held work packages a round looks at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub wp_ids: Vec<String>,
    /// A sweep: every `ready` one, every `retry_wait` one that is due, and a page of `blocked`
    /// ones after this point of the incoming order.
    pub sweep_from: Option<(i64, i64)>,
    /// Also every `ready` one: a slot was freed.
    pub include_ready: bool,
}

impl Scope {
    pub fn ids(wp_ids: Vec<String>) -> Self {
        Scope { wp_ids, sweep_from: None, include_ready: false }
    }
    /// A sweep whose page of blocked work starts after `from` in the incoming order.
    pub fn sweep(from: (i64, i64)) -> Self {
        Scope { wp_ids: Vec::new(), sweep_from: Some(from), include_ready: true }
    }
}

/// Where a sweep starts that looks at blocked work from the beginning of the incoming order.
pub(crate) const SWEEP_START: (i64, i64) = (-1, -1);

/// The scheduler's sweep: what may go without an event this replica saw (retry timers come
/// due, slots freed, gates opened and dependencies completed on another replica, operators'
/// actions). Blocked work is looked at a page per sweep, from where the last one stopped,
/// so a sweep costs the same however large the backlog; a page shorter than a round starts
/// the next sweep from the beginning again.
pub(crate) async fn sweep(ctx: &Ctx) -> anyhow::Result<usize> {
    let from = *ctx.sweep_from.lock().unwrap_or_else(|p| p.into_inner());
    let n = round(ctx, &Scope::sweep(from)).await?;
    let next: Option<(i64, i64)> = sqlx::query_as(
        "SELECT x.source_ms, x.source_seq FROM work_packages x
         WHERE x.status = 'blocked' AND (x.source_ms, x.source_seq) > ($1, $2)
         ORDER BY x.source_ms, x.source_seq OFFSET $3 - 1 LIMIT 1",
    )
    .bind(from.0)
    .bind(from.1)
    .bind(ROUND_LIMIT)
    .fetch_optional(&ctx.pool)
    .await?;
    *ctx.sweep_from.lock().unwrap_or_else(|p| p.into_inner()) = next.unwrap_or(SWEEP_START);
    Ok(n)
}

/// Conditions under which a held work package `w` may go: every dependency completed and
/// every earlier work package of its lane completed or cancelled, that is, `w` is the first
/// open one of its lane. Asked that way, the lane's head is one step down the index of open
/// lane members (migration 0002) instead of a walk over the lane's whole history. Used both to find
/// candidates and, again, in the claim itself. A macro so the queries stay static strings.
macro_rules! may_run {
    () => {
        "
    NOT EXISTS (SELECT 1 FROM work_package_deps d LEFT JOIN work_packages p ON p.wp_id = d.depends_on
                WHERE d.wp_id = w.wp_id AND p.status IS DISTINCT FROM 'completed')
    AND (w.lane IS NULL OR (w.source_ms, w.source_seq) <= (
                SELECT e.source_ms, e.source_seq FROM work_packages e
                WHERE e.lane = w.lane AND e.status NOT IN ('completed', 'cancelled')
                ORDER BY e.source_ms, e.source_seq LIMIT 1))"
    };
}

/// Held work packages in `scope` that may go now, best first; `$1` is the limit, `$2` the
/// wp_ids of the scope. `$held` tests the status: through the open-work index for a sweep, as
/// a filter after the key for a scope of wp_ids (see `store` on `COLLATE "C"`).
///
/// Best first (v1.4): higher `priority`; then fair share among equal priorities: each fairness
/// key's work takes turns (its first, then its second, ...), a key's turns counted on from
/// the work it has in flight already, so that a key with nothing running goes before one
/// with much; then incoming order. The in-flight count per key is capped at the round's limit,
/// counted once per key (materialized: inlined, it ran once per candidate, 38 ms a round of
/// 100 at 1,000 in flight), and not at all when the candidates share one key, where it
/// cannot change the order.
macro_rules! candidates_sql {
    ($held:literal, $scope:expr) => {
        concat!(
            "WITH c AS MATERIALIZED (
                 SELECT w.wp_id, w.requested_agent, w.work_type, w.trigger_subject, w.lane, w.source_ms, w.source_seq,
                        w.plan, w.priority, w.fairness_key, w.created_at, w.next_attempt_at,
                        CASE WHEN w.not_before > now() THEN extract(epoch FROM w.not_before)::float8 END AS delayed_until,
                        row_number() OVER (PARTITION BY w.fairness_key, w.priority ORDER BY w.source_ms, w.source_seq) AS turn
                 FROM work_packages w
                 WHERE ",
            $held,
            "
                   AND (w.status <> 'retry_wait' OR w.next_attempt_at <= now())
                   AND ",
            $scope,
            " AND ",
            may_run!(),
            "),
             busy AS MATERIALIZED (
                 SELECT k.key, (SELECT count(*) FROM (SELECT 1 FROM work_packages d
                                                      WHERE d.status = 'dispatched' AND d.fairness_key = k.key LIMIT $1) x) AS n
                 FROM (SELECT DISTINCT c.fairness_key AS key FROM c) k
                 WHERE (SELECT count(DISTINCT c.fairness_key) FROM c) > 1)
             SELECT w.wp_id, w.requested_agent, w.work_type, w.trigger_subject, w.lane, w.source_ms, w.source_seq, w.plan,
                    w.delayed_until, extract(epoch FROM ",
            eligible_since!(),
            ")::float8 AS eligible_since
             FROM c w LEFT JOIN busy b ON b.key = w.fairness_key
             ORDER BY w.priority DESC, w.turn + coalesce(b.n, 0), w.source_ms, w.source_seq
             LIMIT $1"
        )
    };
}

/// The `ready` work a round looks at, as wp_ids: a share of the round from every fairness key
/// (a skip scan over the keys of the ready-work index, then the best of each key), so that a
/// plan submitted behind a large backlog is seen by the next round. `$1` is the round's limit.
macro_rules! fair_ready {
    () => {
        "(WITH RECURSIVE keys(k) AS (
               (SELECT x.fairness_key FROM work_packages x WHERE x.status = 'ready' ORDER BY x.fairness_key LIMIT 1)
               UNION ALL
               SELECT (SELECT x.fairness_key FROM work_packages x WHERE x.status = 'ready' AND x.fairness_key > keys.k
                       ORDER BY x.fairness_key LIMIT 1)
               FROM keys WHERE keys.k IS NOT NULL),
           picked AS MATERIALIZED (SELECT k FROM keys WHERE k IS NOT NULL LIMIT $1)
           SELECT r.wp_id FROM picked CROSS JOIN LATERAL (
               SELECT x.wp_id FROM work_packages x WHERE x.status = 'ready' AND x.fairness_key = picked.k
               ORDER BY x.priority DESC, x.source_ms, x.source_seq
               LIMIT (SELECT ($1 + count(*) - 1) / count(*) FROM picked)) r)"
    };
}

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

struct Candidate {
    wp_id: String,
    requested_agent: Option<String>,
    work_type: Option<String>,
    trigger: Option<String>,
    lane: Option<String>,
    order: (i64, i64),
    plan: Option<String>,
    /// Its `not_before` (Unix seconds) while that is still to come, by the transaction's
    /// clock, the one `dispatched_at` is written with (v1.4).
    delayed_until: Option<f64>,
    /// Unix seconds since when it may run, for the dispatch-latency histogram.
    eligible_since: f64,
}

/// The agents as a round sees them: work in flight, pauses and rate-limit tokens (v1.4).
struct Agents<'a> {
    in_flight: &'a HashMap<String, u32>,
    paused: &'a Paused,
    buckets: &'a HashMap<String, Bucket>,
}

impl AgentState for Agents<'_> {
    fn in_flight(&self, agent: &str) -> u32 {
        self.in_flight.get(agent).copied().unwrap_or(0)
    }
    fn held(&self, agent: &str) -> Option<String> {
        if let Some(p) = self.paused.get(PauseScope::Agent, Some(agent)) {
            return Some(p.wait_reason());
        }
        self.buckets.get(agent).and_then(|b| b.held(agent))
    }
}

/// One dispatch round. Returns how many work packages were dispatched.
pub async fn round(ctx: &Ctx, scope: &Scope) -> anyhow::Result<usize> {
    let held = std::mem::take(&mut *ctx.gate_held.lock().unwrap_or_else(|p| p.into_inner()));
    let widened;
    let scope = if held.is_empty() {
        scope
    } else {
        widened = Scope { wp_ids: scope.wp_ids.iter().cloned().chain(held).collect(), ..scope.clone() };
        &widened
    };
    if scope.sweep_from.is_none() && !scope.include_ready && scope.wp_ids.is_empty() {
        return Ok(0);
    }
    let routing = ctx.routing.get();
    let mut tx = ctx.pool.begin().await?;

    // One statement per kind of scope, so each gets its own plan: a round over a few wp_ids
    // looks them up by key instead of filtering the whole backlog.
    let query = match scope.sweep_from {
        Some((ms, seq)) => sqlx::query(candidates_sql!(
            "w.status IN ('blocked', 'ready', 'retry_wait')",
            concat!(
                "w.wp_id IN (
                 (SELECT x.wp_id FROM work_packages x WHERE x.status = 'blocked' AND (x.source_ms, x.source_seq) > ($3, $4)
                  ORDER BY x.source_ms, x.source_seq LIMIT $1)
                 UNION ALL ",
                fair_ready!(),
                "
                 UNION ALL (SELECT x.wp_id FROM work_packages x WHERE x.status = 'retry_wait' AND x.next_attempt_at <= now()
                            ORDER BY x.source_ms, x.source_seq LIMIT $1)
                 UNION ALL SELECT unnest($2::text[]))"
            )
        ))
        .bind(ROUND_LIMIT)
        .bind(&scope.wp_ids)
        .bind(ms)
        .bind(seq),
        None if scope.include_ready => sqlx::query(candidates_sql!(
            "w.status IN ('blocked', 'ready', 'retry_wait')",
            concat!("w.wp_id IN (SELECT unnest($2::text[]) UNION ALL ", fair_ready!(), ")")
        ))
        .bind(ROUND_LIMIT)
        .bind(&scope.wp_ids),
        None => sqlx::query(candidates_sql!("w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait')", "w.wp_id = ANY($2)"))
            .bind(ROUND_LIMIT)
            .bind(&scope.wp_ids),
    };
    let candidates: Vec<Candidate> = query
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| {
            Ok(Candidate {
                wp_id: r.try_get("wp_id")?,
                requested_agent: r.try_get("requested_agent")?,
                work_type: r.try_get("work_type")?,
                trigger: r.try_get("trigger_subject")?,
                lane: r.try_get("lane")?,
                order: (r.try_get("source_ms")?, r.try_get("source_seq")?),
                plan: r.try_get("plan")?,
                delayed_until: r.try_get("delayed_until")?,
                eligible_since: r.try_get("eligible_since")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    if candidates.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let (mut in_flight, limited) = lock_and_count(&mut tx, &routing, &candidates).await?;
    let paused = Paused::load(&mut tx).await?;
    let (mut buckets, clock) = if limited.is_empty() { Default::default() } else { controls::read_buckets(&mut tx, &limited).await? };

    // The lane gate. Two replicas may ingest entries 5 and 6 of one lane in either order; 6 must
    // not start while 5 is still pending in the group, not yet visible here. Asked after the
    // candidates were read and re-checked by the claim below: any earlier entry is then either
    // still pending (held here) or committed before the claim's snapshot (seen by MAY_RUN).
    // Only lanes have an order to keep; a round without lane members skips the round trip.
    let gate = if candidates.iter().any(|c| c.lane.is_some()) {
        let mut redis = ctx.redis.clone();
        let pending = streams::pending_summary(&mut redis, &ctx.settings.names.incoming, &ctx.settings.names.group)
            .await
            .context("reading the pending entries of the incoming stream")?;
        pending.smallest.as_deref().and_then(parse_stream_id)
    } else {
        None
    };

    let mut claims: (Vec<String>, Vec<String>, Vec<String>, Vec<Option<i64>>) = Default::default();
    let mut waits: (Vec<String>, Vec<String>, Vec<String>, Vec<Option<f64>>) = Default::default();
    let mut wait = |wp_id: &str, reason: String, status: &str, due: Option<f64>| {
        waits.0.push(wp_id.to_string());
        waits.1.push(reason);
        waits.2.push(status.to_string());
        waits.3.push(due);
    };
    let mut gated = Vec::new();
    for c in &candidates {
        if let (Some(_), Some(g)) = (&c.lane, gate)
            && c.order > g
        {
            wait(&c.wp_id, format!("lane order: an earlier incoming entry ({}-{}) is still being ingested", g.0, g.1), "blocked", None);
            gated.push(c.wp_id.clone());
            continue;
        }
        // Delayed work waits for its time as `retry_wait`, read again only once it is due.
        if let Some(nb) = c.delayed_until {
            let at = chrono::DateTime::from_timestamp(nb as i64, 0).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default();
            wait(&c.wp_id, format!("delayed: not before {at}"), "retry_wait", Some(nb));
            continue;
        }
        if let Some(p) = paused.get(PauseScope::Plan, c.plan.as_deref()).or_else(|| paused.get(PauseScope::Lane, c.lane.as_deref())) {
            wait(&c.wp_id, p.wait_reason(), "ready", None);
            continue;
        }
        let req = RouteRequest { agent_id: c.requested_agent.as_deref(), work_type: c.work_type.as_deref(), trigger: c.trigger.as_deref() };
        let state = Agents { in_flight: &in_flight, paused: &paused, buckets: &buckets };
        match router::route(&req, &routing, &state) {
            Decision::Dispatch { agent, kind, .. } => {
                *in_flight.entry(agent.clone()).or_insert(0) += 1;
                if let Some(b) = buckets.get_mut(&agent) {
                    b.tokens -= 1.0;
                }
                claims.0.push(c.wp_id.clone());
                claims.3.push(routing.timeout_for(&agent, c.work_type.as_deref()).map(|t| t.as_millis().min(i64::MAX as u128) as i64));
                claims.1.push(agent);
                claims.2.push(kind.as_str().to_string());
            }
            Decision::Wait { reason, .. } => wait(&c.wp_id, reason, "ready", None),
            Decision::DeadLetter { detail, .. } => {
                wait(&c.wp_id, format!("no route under routing {}: {detail}", routing.config_version), "ready", None)
            }
        }
    }

    if !waits.0.is_empty() {
        sqlx::query(
            "WITH locked AS MATERIALIZED (
                 SELECT w.wp_id, c.reason, c.status, c.due
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS c(wp_id, reason, status, due)
                 JOIN work_packages w ON w.wp_id = c.wp_id
                 WHERE w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait')
                   AND (w.status <> c.status OR w.wait_reason IS DISTINCT FROM c.reason)
                 FOR UPDATE OF w SKIP LOCKED)
             UPDATE work_packages w SET status = l.status, wait_reason = l.reason, updated_at = now(),
                    ready_at = CASE WHEN l.status = 'ready' THEN coalesce(w.ready_at, now()) ELSE w.ready_at END,
                    next_attempt_at = CASE WHEN l.due IS NOT NULL THEN to_timestamp(l.due) ELSE w.next_attempt_at END
             FROM locked l WHERE w.wp_id = l.wp_id",
        )
        .bind(&waits.0)
        .bind(&waits.1)
        .bind(&waits.2)
        .bind(&waits.3)
        .execute(&mut *tx)
        .await?;
    }

    // The rows are found by key, locked (skipping those another round holds) and checked in
    // one step; the UPDATE then only writes what it is handed. Each plan is a loop over the
    // batch with a primary-key lookup, whatever the statistics say (see `store`).
    let claim_sql = concat!(
        "WITH locked AS MATERIALIZED (
             SELECT w.wp_id, c.agent, c.route, c.timeout_ms
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS c(wp_id, agent, route, timeout_ms)
             JOIN work_packages w ON w.wp_id = c.wp_id
             WHERE w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait') AND ",
        may_run!(),
        "
               AND NOT EXISTS (SELECT 1 FROM dispatch_pauses p
                               WHERE (p.scope = 'agent' AND p.name = c.agent) OR (p.scope = 'lane' AND p.name = w.lane)
                                  OR (p.scope = 'plan' AND p.name = w.plan))
             FOR UPDATE OF w SKIP LOCKED),
         claimed AS (
             UPDATE work_packages w SET status = 'dispatched', agent_id = l.agent, route = l.route,
                    attempts = w.attempts + 1, dispatch_id = w.wp_id || ':' || (w.attempts + 1),
                    dispatched_at = now(), wait_reason = NULL, next_attempt_at = NULL,
                    updated_at = now(), timeout_ms = l.timeout_ms,
                    deadline_at = now() + make_interval(secs => l.timeout_ms / 1000.0)
             FROM locked l WHERE w.wp_id = l.wp_id
             RETURNING w.wp_id, w.agent_id, w.route, w.attempts, w.dispatch_id, w.fields, w.source_id),
         outbox AS (INSERT INTO dispatch_outbox (dispatch_id, wp_id) SELECT dispatch_id, wp_id FROM claimed)
         SELECT * FROM claimed"
    );
    let claimed = if claims.0.is_empty() {
        Vec::new()
    } else {
        sqlx::query(claim_sql).bind(&claims.0).bind(&claims.1).bind(&claims.2).bind(&claims.3).fetch_all(&mut *tx).await?
    };
    let triggers = claimed.iter().map(|r| trigger_from_row(ctx, r)).collect::<Result<Vec<_>, _>>()?;
    if !buckets.is_empty() {
        // Tokens go for what was claimed, not for what the round meant to claim.
        let mut used: HashMap<String, u32> = HashMap::new();
        for r in &claimed {
            *used.entry(r.try_get("agent_id")?).or_insert(0) += 1;
        }
        for (a, b) in buckets.iter_mut() {
            let meant = claims.1.iter().filter(|x| *x == a).count() as f64;
            b.tokens += meant;
        }
        controls::take_tokens(&mut tx, &buckets, &used, clock).await?;
    }
    tx.commit().await?;
    // Lost if a round fails before this point; the scheduler's sweep still finds them.
    ctx.gate_held.lock().unwrap_or_else(|p| p.into_inner()).extend(gated);

    let since: HashMap<&str, f64> = candidates.iter().map(|c| (c.wp_id.as_str(), c.eligible_since)).collect();
    let observed: Vec<(String, String, f64)> = claimed
        .iter()
        .filter_map(|r| {
            let wp: String = r.try_get("wp_id").ok()?;
            Some((r.try_get("agent_id").ok()?, r.try_get("route").ok()?, since.get(wp.as_str()).copied()?))
        })
        .collect();
    let n = triggers.len();
    publish(ctx, triggers).await?;
    Stats::add(&ctx.stats.routed, n as u64);
    let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    for (agent, kind, since) in observed {
        ctx.metrics.routed(&agent, &kind);
        ctx.metrics.dispatch_latency(&agent, &kind, now - since);
    }
    Ok(n)
}

/// Locks every agent with a `max_in_flight` or a `rate_limit` that a candidate may be given to
/// (in name order, so two rounds cannot deadlock), and returns the work in flight per agent:
/// exact for those, folded from the deltas the triggers of migration 0003 keep; as last folded
/// for the others, whose count only balances the load. Also returns the locked agents with a
/// rate limit, whose buckets the round may now read and write.
#[allow(clippy::type_complexity)]
async fn lock_and_count(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    routing: &RoutingTable,
    candidates: &[Candidate],
) -> Result<(HashMap<String, u32>, Vec<(String, RateLimit)>), sqlx::Error> {
    let mut capped = BTreeSet::new();
    for c in candidates {
        let req = RouteRequest { agent_id: c.requested_agent.as_deref(), work_type: c.work_type.as_deref(), trigger: c.trigger.as_deref() };
        // The router asks for the load of every agent its decision could go to.
        let asked = RefCell::new(Vec::new());
        router::route(&req, routing, &|a: &str| {
            asked.borrow_mut().push(a.to_string());
            0
        });
        capped.extend(
            asked
                .into_inner()
                .into_iter()
                .filter(|a| routing.agents.get(a).is_some_and(|s| s.max_in_flight.is_some() || s.rate_limit.is_some())),
        );
    }
    let capped: Vec<String> = capped.into_iter().collect();
    let limited: Vec<(String, RateLimit)> = capped.iter().filter_map(|a| Some((a.clone(), routing.agents.get(a)?.rate_limit?))).collect();
    if !capped.is_empty() {
        sqlx::query("SELECT count(pg_advisory_xact_lock($1, hashtext(s.a))) FROM (SELECT a FROM unnest($2::text[]) AS a ORDER BY a) s")
            .bind(AGENT_LOCKS)
            .bind(&capped)
            .execute(&mut **tx)
            .await?;
    }
    let rows = sqlx::query(
        "WITH folded AS (DELETE FROM agent_in_flight WHERE agent_id = ANY($1) RETURNING agent_id, n),
              sums AS (SELECT agent_id, sum(n)::int4 AS n FROM folded GROUP BY agent_id),
              kept AS (INSERT INTO agent_in_flight (agent_id, n) SELECT agent_id, n FROM sums WHERE n <> 0)
         SELECT agent_id, n FROM sums WHERE n > 0
         UNION ALL
         SELECT agent_id, sum(n)::int4 FROM agent_in_flight WHERE NOT agent_id = ANY($1) GROUP BY agent_id HAVING sum(n) > 0",
    )
    .bind(&capped)
    .fetch_all(&mut **tx)
    .await?;
    let mut in_flight = HashMap::new();
    for row in rows {
        let n: i32 = row.try_get("n")?;
        in_flight.insert(row.try_get("agent_id")?, n.max(0) as u32);
    }
    Ok((in_flight, limited))
}

/// Folds the in-flight deltas of every agent no round holds, so the rows read for agents
/// without a cap stay few. An agent whose lock is held is left for the round that holds it,
/// which folds it itself: a concurrent fold would hide deltas from its count.
pub(crate) async fn fold_in_flight(ctx: &Ctx) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH free AS (SELECT a FROM (SELECT DISTINCT agent_id AS a FROM agent_in_flight ORDER BY 1) s
                       WHERE pg_try_advisory_xact_lock($1, hashtext(s.a))),
              folded AS (DELETE FROM agent_in_flight WHERE agent_id IN (SELECT a FROM free) RETURNING agent_id, n),
              sums AS (SELECT agent_id, sum(n)::int4 AS n FROM folded GROUP BY agent_id)
         INSERT INTO agent_in_flight (agent_id, n) SELECT agent_id, n FROM sums WHERE n <> 0",
    )
    .bind(AGENT_LOCKS)
    .execute(&ctx.pool)
    .await?;
    Ok(())
}

/// Builds the trigger entry: every incoming field, then the orchestrator's own fields, which
/// win over incoming fields of the same name.
fn trigger_from_row(ctx: &Ctx, r: &sqlx::postgres::PgRow) -> Result<(String, Trigger), sqlx::Error> {
    let wp_id: String = r.try_get("wp_id")?;
    let agent: String = r.try_get("agent_id")?;
    let route: String = r.try_get("route")?;
    let attempts: i32 = r.try_get("attempts")?;
    let dispatch_id: String = r.try_get("dispatch_id")?;
    let source_id: String = r.try_get("source_id")?;
    let fields: serde_json::Value = r.try_get("fields")?;
    let own = [
        ("wp_id", wp_id.clone()),
        ("agent_id", agent.clone()),
        ("route", route),
        ("attempt", attempts.to_string()),
        ("dispatch_id", dispatch_id.clone()),
        ("source_id", source_id),
    ];
    let mut out: Vec<(String, String)> = Vec::new();
    if let Some(obj) = fields.as_object() {
        for (k, v) in obj {
            if own.iter().any(|(o, _)| o == k) {
                continue;
            }
            out.push((k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())));
        }
    }
    out.extend(own.into_iter().map(|(k, v)| (k.to_string(), v)));
    tracing::info!(wp_id = %wp_id, dispatch_id = %dispatch_id, agent_id = %agent, "dispatching");
    Ok((
        dispatch_id.clone(),
        Trigger {
            stream: ctx.settings.names.trigger_stream(&agent),
            dispatch_key: ctx.settings.names.dispatch_key(&dispatch_id),
            fields: out,
        },
    ))
}

async fn publish(ctx: &Ctx, triggers: Vec<(String, Trigger)>) -> anyhow::Result<()> {
    if triggers.is_empty() {
        return Ok(());
    }
    let (ids, triggers): (Vec<String>, Vec<Trigger>) = triggers.into_iter().unzip();
    let mut redis = ctx.redis.clone();
    streams::publish_triggers(&mut redis, &triggers, ctx.settings.dispatch_key_lifetime()).await.context("publishing triggers")?;
    forget_claims(ctx, &ids).await.context("recording published triggers")?;
    Ok(())
}

/// Removes claims from the outbox: their triggers are published, or no longer needed.
async fn forget_claims(ctx: &Ctx, dispatch_ids: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM dispatch_outbox WHERE dispatch_id = ANY($1)").bind(dispatch_ids).execute(&ctx.pool).await?;
    Ok(())
}

/// Publishes claims that no replica confirmed (it crashed or stalled between the claim and the
/// publication). Idempotent: a trigger already in Redis is not added again.
pub(crate) async fn republish_stale(ctx: &Ctx) -> anyhow::Result<usize> {
    let rows = sqlx::query(
        "SELECT o.dispatch_id AS claimed, w.status = 'dispatched' AND w.dispatch_id = o.dispatch_id AS current,
                w.wp_id, w.agent_id, w.route, w.attempts, w.dispatch_id, w.fields, w.source_id
         FROM dispatch_outbox o LEFT JOIN work_packages w ON w.wp_id = o.wp_id
         WHERE o.claimed_at < now() - make_interval(secs => $1::float8)
         ORDER BY o.claimed_at LIMIT 500",
    )
    .bind(ctx.settings.republish_after.as_secs_f64())
    .fetch_all(&ctx.pool)
    .await?;
    // A claim whose work package has moved on (reported on, retried, cancelled) needs no
    // trigger any more; its outbox row goes.
    let mut gone = Vec::new();
    let mut triggers = Vec::new();
    for r in &rows {
        if r.try_get::<Option<bool>, _>("current")? == Some(true) {
            triggers.push(trigger_from_row(ctx, r)?);
        } else {
            gone.push(r.try_get::<String, _>("claimed")?);
        }
    }
    if !gone.is_empty() {
        forget_claims(ctx, &gone).await?;
    }
    let n = triggers.len();
    if n > 0 {
        tracing::warn!(count = n, "publishing dispatches whose publication was not confirmed");
    }
    publish(ctx, triggers).await?;
    Ok(n)
}
