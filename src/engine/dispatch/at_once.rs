//! Claim at once: work that may run now is claimed in the transaction that makes it free to
//! run, instead of being stored `ready` or left `blocked` for a round to read, route and claim
//! in a transaction of its own.
//!
//! - At ingest (`at_ingest`): the ingest's own INSERT stores it `dispatched` (attempt 1, its
//!   outbox row): one row version, one history row, a candidates query and a claim
//!   transaction fewer.
//! - At completion (`at_completion`): a dependent whose last prerequisite a completion met is
//!   claimed by the completion's transaction, after the statement that counted it down: the
//!   next step of a chain costs no round (its candidates query, transaction and agents' read).
//!
//! "May run at once": no approval or event to wait for, not delayed, no unmet prerequisite,
//! no lane at ingest (and at completion only behind the `LaneGate`), and a target whose agents
//! have neither a cap nor a rate limit nor (v1.6) a budget. Such work has nothing to keep order with: no ready work of its target waits for a
//! slot, so taking it first can overtake nothing, and no count needs a lock. Everything else
//! (and what the claim refuses: a paused plan or agent, a plan over its budget, checked again
//! under the row's lock) is left to the round, which keeps priorities, fair share, caps,
//! limits and budgets exact.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::claim;
use super::decide::{self, AgentsNow, Candidate};
use crate::core::entry::{WorkPackageSpec, parse_stream_id};
use crate::core::router::Target;
use crate::core::routing_file::RoutingTable;
use crate::engine::context::Ctx;
use crate::engine::store::{AtOnce, Unblocked};
use crate::engine::streams;

/// Which specs of an ingest batch are claimed at once, and by whom, in the batch's order.
/// Reads the agents' state (one statement) only when some spec qualifies.
pub(crate) async fn at_ingest(
    pool: &PgPool,
    routing: &RoutingTable,
    specs: &[WorkPackageSpec],
    targets: &[String],
) -> Result<Vec<Option<AtOnce>>, sqlx::Error> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let candidates: Vec<(usize, Candidate)> = specs
        .iter()
        .zip(targets)
        .enumerate()
        .filter(|(_, (spec, target))| spec_free(spec, now_ms) && unlimited(target, routing))
        .map(|(i, (spec, target))| (i, candidate_of_spec(spec, target, routing)))
        .collect();
    let mut out = vec![None; specs.len()];
    if candidates.is_empty() {
        return Ok(out);
    }
    let (mut agents, _) = claim::agents_now(pool, routing, &[]).await?;
    let only: Vec<Candidate> = candidates.iter().map(|(_, c)| c.clone()).collect();
    let index: HashMap<&str, usize> = candidates.iter().map(|(i, c)| (c.wp_id.as_str(), *i)).collect();
    for claim in decide::decide(&only, routing, &mut agents, None).claims {
        if let Some(i) = index.get(claim.wp_id.as_str()) {
            out[*i] = Some(AtOnce { agent: claim.agent, route: claim.kind.as_str(), timeout_ms: claim.timeout_ms });
        }
    }
    Ok(out)
}

/// What a completion's transaction claims of what it let go (`store::unblocked_by`), and what
/// it leaves to a round (the wp_ids of the rest: lane successors, work that waits for something
/// else, work of limited agents, and what the claim refused). The claimed rows are published
/// after the commit (`publish_claimed`). Reads the agents' state only when a role target
/// has several agents to choose the least loaded among.
pub(crate) async fn at_completion(
    tx: &mut Transaction<'_, Postgres>,
    routing: &RoutingTable,
    unblocked: &[Unblocked],
    gate: LaneGate,
) -> Result<(Vec<PgRow>, Vec<String>), sqlx::Error> {
    let candidates: Vec<Candidate> = unblocked
        .iter()
        .filter(|u| u.free && u.routed_by.as_deref() == Some(routing.config_version.as_str()))
        .filter(|u| u.lane.is_none() || gate.lets(u.order))
        .filter(|u| u.target.as_deref().is_some_and(|t| unlimited(t, routing)))
        .map(candidate_of_unblocked)
        .collect();
    let claimed = if candidates.is_empty() {
        Vec::new()
    } else {
        let mut agents = if candidates.iter().any(|c| c.target.as_deref().is_some_and(|t| agent_count(t, routing) > 1)) {
            claim::agents_now(&mut **tx, routing, &[]).await?.0
        } else {
            AgentsNow::default()
        };
        let decided = decide::decide(&candidates, routing, &mut agents, None);
        claim::claim(tx, &decided.claims, routing).await?
    };
    let taken: HashSet<String> = claimed.iter().filter_map(|r| r.try_get::<String, _>("wp_id").ok()).collect();
    let rest = unblocked.iter().filter(|u| !taken.contains(&u.wp_id)).map(|u| u.wp_id.clone()).collect();
    Ok((claimed, rest))
}

/// The lane gate of a claim at completion: the incoming stream's group as it was before the
/// completion's transaction began, its last delivered entry and its smallest pending one. A
/// lane member goes at once only if its own entry had been delivered by then and no entry
/// before it was pending: every earlier entry of its lane was delivered before that moment
/// (a group delivers in entry order), and none was pending, so each was acknowledged, which
/// an entry is only once its work package is stored; the claim, which starts later, then sees
/// it (the claim takes only the first open member of a lane). The round asks the same of the
/// pending entries after reading its candidates; here the read comes first, outside the
/// transaction, and the delivered entry stands in for the order.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct LaneGate {
    delivered: Option<(i64, i64)>,
    pending: Option<(i64, i64)>,
}

impl LaneGate {
    /// Reads it, in one round trip; closed (no lane member goes at once) if Redis does not
    /// answer.
    pub(crate) async fn read(ctx: &Ctx) -> LaneGate {
        let mut redis = ctx.redis.clone();
        match streams::delivered_and_pending(&mut redis, &ctx.settings.names.incoming, &ctx.settings.names.group).await {
            Ok((delivered, pending)) => LaneGate::of(delivered.as_deref(), pending.as_deref()),
            Err(e) => {
                tracing::debug!(error = %e, "lane gate not read; lane members wait for a round");
                LaneGate::default()
            }
        }
    }

    fn of(delivered: Option<&str>, pending: Option<&str>) -> LaneGate {
        LaneGate { delivered: delivered.and_then(parse_stream_id), pending: pending.and_then(parse_stream_id) }
    }

    /// Whether the lane member whose entry is `order` may go at once.
    fn lets(&self, order: (i64, i64)) -> bool {
        self.delivered.is_some_and(|d| order <= d) && self.pending.is_none_or(|p| order <= p)
    }
}

/// Whether a spec's own fields let it run as soon as it is stored.
fn spec_free(spec: &WorkPackageSpec, now_ms: i64) -> bool {
    // (v1.6) A step that waits for an approval or an event goes to no agent.
    spec.wait.is_none() && spec.depends_on.is_empty() && spec.lane.is_none() && spec.not_before_ms.is_none_or(|nb| nb <= now_ms)
}

/// Whether every agent of `target` takes work without a cap, a rate limit or (v1.6) a budget
/// (an agent with a budget is decided by the round, which reads its spend; work of a plan
/// with a budget is refused by the claim itself).
fn unlimited(target: &str, routing: &RoutingTable) -> bool {
    let Some(target) = Target::parse(target) else { return false };
    let agents = target.agents(routing);
    !agents.is_empty()
        && agents
            .iter()
            .all(|a| routing.agents.get(*a).is_some_and(|s| s.max_in_flight.is_none() && s.rate_limit.is_none() && s.budget.is_none()))
}

fn agent_count(target: &str, routing: &RoutingTable) -> usize {
    Target::parse(target).map_or(0, |t| t.agents(routing).len())
}

fn candidate_of_spec(spec: &WorkPackageSpec, target: &str, routing: &RoutingTable) -> Candidate {
    Candidate {
        wp_id: spec.wp_id.clone(),
        requested_agent: spec.agent_id.clone(),
        work_type: spec.work_type.clone(),
        trigger: spec.trigger.clone(),
        target: Some(target.to_string()),
        routed_by: Some(routing.config_version.clone()),
        lane: None,
        order: (spec.source_ms, spec.source_seq),
        plan: spec.plan.clone(),
        delayed_until: None,
        eligible_since: 0.0,
        wait_for: None,
    }
}

fn candidate_of_unblocked(u: &Unblocked) -> Candidate {
    Candidate {
        wp_id: u.wp_id.clone(),
        requested_agent: u.requested_agent.clone(),
        work_type: u.work_type.clone(),
        trigger: u.trigger.clone(),
        target: u.target.clone(),
        routed_by: u.routed_by.clone(),
        lane: u.lane.clone(),
        order: u.order,
        plan: u.plan.clone(),
        delayed_until: None,
        eligible_since: 0.0,
        wait_for: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_member_goes_at_once_only_if_delivered_before_and_nothing_earlier_pending() {
        let gate = LaneGate::of(Some("100-0"), Some("90-1"));
        assert!(gate.lets((80, 0)), "delivered, nothing earlier pending");
        assert!(gate.lets((90, 1)), "its own entry the smallest pending: nothing earlier is");
        assert!(!gate.lets((95, 0)), "an earlier entry is still pending");
        let idle = LaneGate::of(Some("100-0"), None);
        assert!(idle.lets((100, 0)) && !idle.lets((100, 1)), "not yet delivered when the gate was read");
        assert!(!LaneGate::default().lets((1, 0)), "unread: closed");
    }
}
