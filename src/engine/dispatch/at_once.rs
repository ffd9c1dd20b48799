//! Claim at ingest: an ingest batch's work that may run at once is claimed by the statement
//! that stores it (status `dispatched`, attempt 1, its outbox row), instead of being stored
//! `ready` and claimed again by the round after the ingest: one row version, one history row,
//! a candidates query and a claim transaction fewer for such work.
//!
//! "May run at once": no dependencies, no lane, not delayed, and a target whose agents have
//! neither a cap nor a rate limit. Such work has nothing to keep order with: no ready work of
//! its target waits for a slot, so taking it first can overtake nothing, and no count needs a
//! lock. Everything else (and work whose agent is paused or disabled, (v1.6) has a budget, or
//! whose plan has one) is stored as before and decided by the round, which keeps priorities,
//! fair share, caps, limits and budgets exact.

use std::collections::HashMap;

use sqlx::PgPool;

use super::claim;
use super::decide::{self, AgentsNow, Candidate};
use crate::core::entry::WorkPackageSpec;
use crate::core::router::Target;
use crate::core::routing_file::RoutingTable;
use crate::engine::store::AtOnce;

/// Which specs of a batch are claimed at once, and by whom, in the batch's order. Reads the
/// agents' state (one statement) only when some spec qualifies.
pub(crate) async fn claims(
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
        .filter(|(_, (spec, target))| may_run_at_once(spec, target, routing, now_ms))
        .map(|(i, (spec, target))| (i, candidate(spec, target, routing)))
        .collect();
    let mut out = vec![None; specs.len()];
    if candidates.is_empty() {
        return Ok(out);
    }
    let (mut agents, _) = claim::agents_now(pool, routing, &[]).await?;
    decide_claims(&candidates, routing, &mut agents, &mut out);
    Ok(out)
}

fn decide_claims(candidates: &[(usize, Candidate)], routing: &RoutingTable, agents: &mut AgentsNow, out: &mut [Option<AtOnce>]) {
    let only: Vec<Candidate> = candidates.iter().map(|(_, c)| c.clone()).collect();
    let index: HashMap<&str, usize> = candidates.iter().map(|(i, c)| (c.wp_id.as_str(), *i)).collect();
    for claim in decide::decide(&only, routing, agents, None).claims {
        if let Some(i) = index.get(claim.wp_id.as_str()) {
            out[*i] = Some(AtOnce { agent: claim.agent, route: claim.kind.as_str(), timeout_ms: claim.timeout_ms });
        }
    }
}

fn may_run_at_once(spec: &WorkPackageSpec, target: &str, routing: &RoutingTable, now_ms: i64) -> bool {
    // (v1.6) A step that waits for an approval or an event goes to no agent.
    if spec.wait.is_some() || !spec.depends_on.is_empty() || spec.lane.is_some() || spec.not_before_ms.is_some_and(|nb| nb > now_ms) {
        return false;
    }
    let Some(target) = Target::parse(target) else { return false };
    let agents = target.agents(routing);
    // (v1.6) An agent with a budget is decided by the round, which reads its spend; so is work
    // of a plan with a budget (the insert itself checks that).
    !agents.is_empty()
        && agents
            .iter()
            .all(|a| routing.agents.get(*a).is_some_and(|s| s.max_in_flight.is_none() && s.rate_limit.is_none() && s.budget.is_none()))
}

fn candidate(spec: &WorkPackageSpec, target: &str, routing: &RoutingTable) -> Candidate {
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
