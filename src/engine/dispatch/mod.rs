//! Dispatch: from "this may run now" to "its trigger is published", as a short pipeline:
//!
//! 1. `candidates`: what may run, read outside any transaction: the work packages a round was
//!    given, and ready work only of the targets whose agents can take some now (`decide::
//!    open_targets`), so that a held backlog costs nothing and holds nothing back;
//! 2. the lane gate, asked of Redis with no transaction open;
//! 3. `claim`: under the locks of the capped agents the candidates may go to, the agents'
//!    exact state, then `decide` (pure) says what is claimed and why the rest waits, and the
//!    claim writes both with the outbox rows;
//! 4. `publish`: the triggers, then the outbox rows of those Redis holds.
//!
//! Work that may run at once (no lane, wait or delay; agents without caps or rate limits)
//! skips 1-3: `at_once` claims it in the transaction that makes it free to run, the ingest's
//! INSERT (no dependencies) or the completion of its last prerequisite.
//!
//! Exactly-once rests on two things. The claim (status `dispatched`, attempt + 1, a new
//! `dispatch_id`) is one UPDATE of rows it locks first, skipping rows another round holds, so
//! only one round can claim a given attempt. Publication is a Redis script that adds the
//! trigger only if its `dispatch_id` key is new, so publishing a claimed dispatch again (after a
//! crash, or by a replica that was paused) is harmless.

pub(crate) mod at_once;
mod candidates;
mod claim;
mod decide;
mod publish;
mod reroute;

use std::collections::HashMap;

use anyhow::Context;
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::core::entry::parse_stream_id;
use crate::engine::budgets;
use crate::engine::context::{Ctx, Stats};
use crate::engine::streams;

pub use decide::Ready;
pub(crate) use publish::republish_stale;
pub(crate) use reroute::reroute_open_work;

/// Which held work packages a round looks at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub wp_ids: Vec<String>,
    /// A sweep: every `retry_wait` one that is due, and a page of `blocked` ones after this
    /// point of the incoming order.
    pub sweep_from: Option<(i64, i64)>,
    /// Whose ready work it reads too.
    pub ready: Ready,
}

impl Scope {
    pub fn ids(wp_ids: Vec<String>) -> Self {
        Scope { wp_ids, ..Scope::default() }
    }
    /// A sweep whose page of blocked work starts after `from` in the incoming order.
    pub fn sweep(from: (i64, i64)) -> Self {
        Scope { wp_ids: Vec::new(), sweep_from: Some(from), ready: Ready::All }
    }
}

/// Where a sweep starts that looks at blocked work from the beginning of the incoming order.
pub(crate) const SWEEP_START: (i64, i64) = (-1, -1);

/// The scheduler's sweep: what may go without an event this replica saw (retry timers come
/// due, slots freed, gates opened and dependencies completed on another replica, operators'
/// actions). Blocked work is looked at a page per sweep, from where the last one stopped,
/// so a sweep costs the same however large the backlog; a page shorter than a round starts
/// the next sweep from the beginning again. Only blocked work whose prerequisites are all met
/// is paged through (work behind its lane's head): what waits for a prerequisite comes back
/// from the completion that meets its last one (`store::unblocked_by`), so however much of it
/// there is, no sweep reads it.
pub(crate) async fn sweep(ctx: &Ctx) -> anyhow::Result<usize> {
    let from = *ctx.sweep_from.lock().unwrap_or_else(|p| p.into_inner());
    let n = round(ctx, &Scope::sweep(from)).await?;
    let next: Option<(i64, i64)> = sqlx::query_as(
        "SELECT x.source_ms, x.source_seq FROM work_packages x
         WHERE x.status = 'blocked' AND x.unmet_deps = 0 AND (x.source_ms, x.source_seq) > ($1, $2)
         ORDER BY x.source_ms, x.source_seq OFFSET $3 - 1 LIMIT 1",
    )
    .bind(from.0)
    .bind(from.1)
    .bind(decide::ROUND_LIMIT)
    .fetch_optional(&ctx.pool)
    .await?;
    *ctx.sweep_from.lock().unwrap_or_else(|p| p.into_inner()) = next.unwrap_or(SWEEP_START);
    Ok(n)
}

/// When a round tries again what its claim skipped (see `round`).
const SKIPPED_RETRIES: [std::time::Duration; 5] = [
    std::time::Duration::from_millis(1),
    std::time::Duration::from_millis(5),
    std::time::Duration::from_millis(20),
    std::time::Duration::from_millis(50),
    std::time::Duration::from_millis(100),
];

/// One dispatch round, and the retries of what its claim skipped. Returns how many work
/// packages were dispatched.
///
/// The claim skips rows another transaction has locked (`SKIP LOCKED`): another round's claim,
/// or the ingest of a dependent, whose count locks its prerequisites `FOR SHARE` for the few
/// milliseconds of its transaction. In the second case the row is free to claim just after,
/// and no event would bring a round to it before the sweep (a chain's second step waited
/// 470 ms, the sweep's interval, in about one in a thousand steps): so what was decided but
/// skipped is tried again, a few times, shortly after. What is still refused then (a pause or
/// a budget the claim saw, another round's claim) is left to the sweep, as before.
pub async fn round(ctx: &Ctx, scope: &Scope) -> anyhow::Result<usize> {
    let (mut dispatched, mut skipped) = round_once(ctx, scope).await?;
    for pause in SKIPPED_RETRIES {
        if skipped.is_empty() {
            break;
        }
        tokio::time::sleep(pause).await;
        let (more, still) = round_once(ctx, &Scope::ids(skipped)).await?;
        dispatched += more;
        skipped = still;
    }
    Ok(dispatched)
}

/// One dispatch round: how many it dispatched, and what it decided to claim but the claim
/// skipped.
async fn round_once(ctx: &Ctx, scope: &Scope) -> anyhow::Result<(usize, Vec<String>)> {
    let held = std::mem::take(&mut *ctx.gate_held.lock().unwrap_or_else(|p| p.into_inner()));
    let widened;
    let scope = if held.is_empty() {
        scope
    } else {
        widened = Scope { wp_ids: scope.wp_ids.iter().cloned().chain(held).collect(), ..scope.clone() };
        &widened
    };
    if scope.sweep_from.is_none() && scope.ready == Ready::None && scope.wp_ids.is_empty() {
        return Ok((0, Vec::new()));
    }
    let routing = ctx.routing.get();

    // 1. What may run. Which targets' ready work is worth reading is decided from the agents'
    // state as it is now, unlocked: a count that is stale by a completion only makes a round
    // read a target whose slot is gone (the claim then says it waits) or leave one whose slot
    // was just freed to the round that completion starts.
    let open = if scope.ready == Ready::None {
        Vec::new()
    } else {
        let (mut agents, _) = claim::agents_now(&ctx.pool, &routing, &[]).await?;
        agents.agents_over_budget = budgets::agents_held(&ctx.pool, &routing).await?;
        decide::open_targets(&routing, &agents, &scope.ready)
    };
    let candidates = candidates::read(&ctx.pool, scope, &open).await?;
    tracing::debug!(asked = ?scope.wp_ids, candidates = ?candidates.iter().map(|c| c.wp_id.as_str()).collect::<Vec<_>>(), "round candidates");
    if candidates.is_empty() {
        return Ok((0, Vec::new()));
    }

    // 2. The lane gate. Two replicas may ingest entries 5 and 6 of one lane in either order; 6
    // must not start while 5 is still pending in the group, not yet visible here. Asked after
    // the candidates were read and before the claim, which checks them again: any earlier
    // entry is then either still pending (held here) or committed before the claim's snapshot
    // (seen by `may_run`). Only lanes have an order to keep; a round without lane members
    // skips the round trip.
    let gate = if candidates.iter().any(|c| c.lane.is_some()) {
        let mut redis = ctx.redis.clone();
        let pending = streams::pending_summary(&mut redis, &ctx.settings.names.incoming, &ctx.settings.names.group)
            .await
            .context("reading the pending entries of the incoming stream")?;
        pending.smallest.as_deref().and_then(parse_stream_id)
    } else {
        None
    };

    // 3. The claim.
    let mut tx = ctx.pool.begin().await?;
    let limited = decide::limited_agents(&routing, &candidates);
    claim::lock(&mut tx, &limited).await?;
    let (mut agents, clock) = claim::agents_now(&mut *tx, &routing, &limited).await?;
    // Budgets (v1.6): read in the claim's transaction, the plans' under their budget locks,
    // and checked again by the claim itself, so no replica claims work after the spend that
    // reached its budget was recorded.
    agents.agents_over_budget = budgets::agents_held(&mut *tx, &routing).await?;
    let plans: Vec<String> =
        candidates.iter().filter_map(|c| c.plan.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    agents.plans_over_budget = budgets::plans_held(&mut tx, &plans, &ctx.plan_budgets).await?;
    let buckets = agents.buckets.clone();
    let decided = decide::decide(&candidates, &routing, &mut agents, gate);
    claim::record_waits(&mut tx, &decided.waits, &routing.config_version).await?;
    let claimed = claim::claim(&mut tx, &decided.claims, &routing).await?;
    let taken: std::collections::HashSet<&str> = claimed.iter().filter_map(|r| r.try_get::<&str, _>("wp_id").ok()).collect();
    let skipped: Vec<String> = decided.claims.iter().filter(|c| !taken.contains(c.wp_id.as_str())).map(|c| c.wp_id.clone()).collect();
    tracing::debug!(decided = decided.claims.len(), waits = decided.waits.len(), claimed = claimed.len(), skipped = ?skipped, "round claims");
    claim::take_tokens(&mut tx, &buckets, &claimed, clock).await?;
    let awaiting_events = claim::enter_waiting(&mut tx, &decided.awaits).await?;
    tx.commit().await?;
    if !awaiting_events.is_empty() {
        crate::engine::kept_events::settle(ctx, &awaiting_events).await?;
    }
    // Lost if a round fails before this point; the scheduler's sweep still finds them.
    ctx.gate_held.lock().unwrap_or_else(|p| p.into_inner()).extend(decided.gated);

    // 4. Publication.
    let since: HashMap<&str, f64> = candidates.iter().map(|c| (c.wp_id.as_str(), c.eligible_since)).collect();
    let dispatched = publish_claimed(ctx, &claimed, |wp| since.get(wp).copied()).await?;
    Ok((dispatched, skipped))
}

/// Publishes what a round or an ingest claimed (rows as the claim returns them) and counts
/// it, with the time each became free to run (`since`, Unix seconds) for the latency metric.
pub(crate) async fn publish_claimed(ctx: &Ctx, claimed: &[PgRow], since: impl Fn(&str) -> Option<f64>) -> anyhow::Result<usize> {
    if claimed.is_empty() {
        return Ok(0);
    }
    let outgoing = claimed.iter().map(|r| publish::trigger_from_row(ctx, r)).collect::<Result<Vec<_>, _>>()?;
    publish::waited(ctx, &outgoing, &since);
    let observed: Vec<(String, String, f64)> = claimed
        .iter()
        .filter_map(|r| {
            let wp: String = r.try_get("wp_id").ok()?;
            Some((r.try_get("agent_id").ok()?, r.try_get("route").ok()?, since(wp.as_str())?))
        })
        .collect();
    let n = outgoing.len();
    publish::publish(ctx, outgoing).await?;
    Stats::add(&ctx.stats.routed, n as u64);
    let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    for (agent, kind, since) in observed {
        ctx.metrics.routed(&agent, &kind);
        ctx.metrics.dispatch_latency(&agent, &kind, now - since);
    }
    Ok(n)
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
    .bind(claim::AGENT_LOCKS)
    .execute(&ctx.pool)
    .await?;
    Ok(())
}
