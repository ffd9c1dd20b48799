//! The round's decisions, pure: which targets can take work now, and for each candidate
//! whether it is claimed (by which agent) or waits (why, as what, until what). No I/O: the
//! round reads the state, these functions decide, the round writes what they decided.

use std::collections::{BTreeSet, HashMap};

use crate::core::router::{self, AgentState, Decision, Dest, RouteKind, RouteRequest, Target};
use crate::core::routing_file::RoutingTable;
use crate::engine::controls::{Bucket, PauseScope, Paused};

/// The most work packages a round reads or claims.
pub(crate) const ROUND_LIMIT: i64 = 1000;

/// A held work package that may go now as far as PostgreSQL knows: its dependencies are done
/// and it is the first open one of its lane.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub wp_id: String,
    pub requested_agent: Option<String>,
    pub work_type: Option<String>,
    pub trigger: Option<String>,
    /// Where it was routed when it arrived (`Target::key`), and under which routing file.
    pub target: Option<String>,
    pub routed_by: Option<String>,
    pub lane: Option<String>,
    pub order: (i64, i64),
    pub plan: Option<String>,
    /// Its `not_before` (Unix seconds) while that is still to come, by the database's clock.
    pub delayed_until: Option<f64>,
    /// Unix seconds since when it may run, for the dispatch-latency histogram.
    pub eligible_since: f64,
}

impl Candidate {
    fn request(&self) -> RouteRequest<'_> {
        RouteRequest { agent_id: self.requested_agent.as_deref(), work_type: self.work_type.as_deref(), trigger: self.trigger.as_deref() }
    }
}

/// The agents as a round sees them: work in flight, pauses, rate-limit tokens (v1.4).
#[derive(Debug, Default)]
pub(crate) struct AgentsNow {
    pub in_flight: HashMap<String, u32>,
    pub paused: Paused,
    pub buckets: HashMap<String, Bucket>,
    /// (v1.6) Agents whose budget is reached, and plans (of the round's candidates) whose
    /// budget is reached, each with why its work waits.
    pub agents_over_budget: HashMap<String, String>,
    pub plans_over_budget: HashMap<String, String>,
}

impl AgentState for AgentsNow {
    fn in_flight(&self, agent: &str) -> u32 {
        self.in_flight.get(agent).copied().unwrap_or(0)
    }
    fn held(&self, agent: &str) -> Option<String> {
        if let Some(p) = self.paused.get(PauseScope::Agent, Some(agent)) {
            return Some(p.wait_reason());
        }
        if let Some(reason) = self.agents_over_budget.get(agent) {
            return Some(reason.clone());
        }
        self.buckets.get(agent).and_then(|b| b.held(agent))
    }
}

impl AgentsNow {
    /// How many more `agent` may take now: none when it is unknown, disabled, paused or out of
    /// tokens; else what its cap and its tokens leave (at most a round).
    pub fn free(&self, agent: &str, routing: &RoutingTable) -> i64 {
        let Some(spec) = routing.agents.get(agent) else { return 0 };
        if !spec.enabled || self.held(agent).is_some() {
            return 0;
        }
        let by_cap = spec.max_in_flight.map_or(ROUND_LIMIT, |cap| i64::from(cap) - i64::from(self.in_flight(agent)));
        let by_rate = self.buckets.get(agent).map_or(ROUND_LIMIT, |b| b.tokens.floor() as i64);
        by_cap.min(by_rate).clamp(0, ROUND_LIMIT)
    }

    fn take(&mut self, agent: &str) {
        *self.in_flight.entry(agent.to_string()).or_insert(0) += 1;
        if let Some(b) = self.buckets.get_mut(agent) {
            b.tokens -= 1.0;
        }
    }
}

/// Whose ready work a round reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Ready {
    /// None: only the work packages it was given.
    #[default]
    None,
    /// The targets these agents serve: their slots were freed.
    Of(BTreeSet<String>),
    /// Every target.
    All,
}

/// Every target of the routing file: each agent by `agent_id`, each role of a work type, each
/// trigger rule's role or agent, the default agent.
fn targets(routing: &RoutingTable) -> BTreeSet<Target> {
    let mut out = BTreeSet::new();
    for a in routing.agents.keys() {
        out.insert(Target { kind: RouteKind::Explicit, dest: Dest::Agent(a.clone()) });
    }
    for r in routing.work_types.values() {
        out.insert(Target { kind: RouteKind::WorkType, dest: Dest::Role(r.clone()) });
    }
    for t in &routing.triggers {
        out.insert(Target { kind: RouteKind::Trigger, dest: Dest::from(&t.target) });
    }
    if let Some(d) = &routing.default_agent {
        out.insert(Target { kind: RouteKind::Default, dest: Dest::Agent(d.clone()) });
    }
    out
}

/// The targets whose ready work a round reads, each with how many its agents can take now.
/// A target none of whose agents can take anything is not read at all: its backlog, however
/// large, costs a round nothing and holds no other target's work back.
pub(crate) fn open_targets(routing: &RoutingTable, agents: &AgentsNow, ready: &Ready) -> Vec<(String, i64)> {
    if *ready == Ready::None {
        return Vec::new();
    }
    targets(routing)
        .into_iter()
        .filter_map(|t| {
            let names = t.agents(routing);
            if let Ready::Of(freed) = ready
                && !names.iter().any(|a| freed.contains(*a))
            {
                return None;
            }
            let free: i64 = names.iter().map(|a| agents.free(a, routing)).sum();
            (free > 0).then(|| (t.key(), free.min(ROUND_LIMIT)))
        })
        .collect()
}

/// The agents a round must lock to count them exactly: those with a cap or a rate limit that
/// one of the candidates may go to.
pub(crate) fn limited_agents(routing: &RoutingTable, candidates: &[Candidate]) -> Vec<String> {
    let mut out = BTreeSet::new();
    for c in candidates {
        let Ok(target) = target_of(c, routing) else { continue };
        out.extend(
            target
                .agents(routing)
                .into_iter()
                .filter(|a| {
                    routing.agents.get(*a).is_some_and(|s| s.max_in_flight.is_some() || s.rate_limit.is_some() || s.budget.is_some())
                })
                .map(str::to_string),
        );
    }
    out.into_iter().collect()
}

/// The candidate's target under `routing`: the one it was given when it arrived, or, when the
/// routing file changed since, routed again; or why it has no route now.
fn target_of(c: &Candidate, routing: &RoutingTable) -> Result<Target, String> {
    if c.routed_by.as_deref() == Some(routing.config_version.as_str())
        && let Some(t) = c.target.as_deref().and_then(Target::parse)
    {
        return Ok(t);
    }
    router::resolve(&c.request(), routing).map_err(|(_, detail)| detail)
}

/// How a waiting work package is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitAs {
    Blocked,
    Ready,
    /// Read again only once `due`.
    RetryWait,
}

impl WaitAs {
    pub fn as_str(&self) -> &'static str {
        match self {
            WaitAs::Blocked => "blocked",
            WaitAs::Ready => "ready",
            WaitAs::RetryWait => "retry_wait",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claim {
    pub wp_id: String,
    pub agent: String,
    pub kind: RouteKind,
    pub timeout_ms: Option<i64>,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Wait {
    pub wp_id: String,
    pub reason: String,
    pub status: WaitAs,
    pub due: Option<f64>,
    /// The pause of a plan or lane that holds it (`plan:nightly`): it leaves the ready work
    /// rounds read until that pause ends.
    pub held_by: Option<String>,
    /// Its target when routed again under a new routing file (None: unchanged or no route).
    pub target: Option<String>,
}

/// What a round decided.
#[derive(Debug, Default)]
pub(crate) struct Decisions {
    pub claims: Vec<Claim>,
    pub waits: Vec<Wait>,
    /// Held at the lane gate: looked at again by this replica's next round.
    pub gated: Vec<String>,
}

/// Decides every candidate, best first (the order they come in), giving each agent no more
/// than it can take. `gate` is the smallest incoming entry still being ingested: lane members
/// after it wait for it.
pub(crate) fn decide(candidates: &[Candidate], routing: &RoutingTable, agents: &mut AgentsNow, gate: Option<(i64, i64)>) -> Decisions {
    let mut out = Decisions::default();
    for c in candidates {
        let wait = |reason: String, status: WaitAs| Wait { wp_id: c.wp_id.clone(), reason, status, due: None, held_by: None, target: None };
        if let (Some(_), Some(g)) = (&c.lane, gate)
            && c.order > g
        {
            out.waits
                .push(wait(format!("lane order: an earlier incoming entry ({}-{}) is still being ingested", g.0, g.1), WaitAs::Blocked));
            out.gated.push(c.wp_id.clone());
            continue;
        }
        if let Some(nb) = c.delayed_until {
            let at = chrono::DateTime::from_timestamp(nb as i64, 0).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default();
            out.waits.push(Wait { due: Some(nb), ..wait(format!("delayed: not before {at}"), WaitAs::RetryWait) });
            continue;
        }
        let pause = c
            .plan
            .as_deref()
            .and_then(|p| agents.paused.get(PauseScope::Plan, Some(p)).map(|x| (x, format!("plan:{p}"))))
            .or_else(|| c.lane.as_deref().and_then(|l| agents.paused.get(PauseScope::Lane, Some(l)).map(|x| (x, format!("lane:{l}")))));
        if let Some((p, hold)) = pause {
            out.waits.push(Wait { held_by: Some(hold), ..wait(p.wait_reason(), WaitAs::Ready) });
            continue;
        }
        // A plan whose budget is reached holds its work as a pause does, until an operator
        // raises or removes the budget.
        if let Some((plan, reason)) = c.plan.as_deref().and_then(|p| agents.plans_over_budget.get(p).map(|r| (p, r))) {
            out.waits.push(Wait { held_by: Some(crate::engine::budgets::held_by(plan)), ..wait(reason.clone(), WaitAs::Ready) });
            continue;
        }
        let current = c.routed_by.as_deref() == Some(routing.config_version.as_str());
        let target = match target_of(c, routing) {
            Ok(t) => t,
            Err(detail) => {
                out.waits.push(wait(format!("no route under routing {}: {detail}", routing.config_version), WaitAs::Ready));
                continue;
            }
        };
        match router::dispatch_to(&c.request(), &target, routing, agents) {
            Decision::Dispatch { agent, kind, .. } => {
                agents.take(&agent);
                let timeout_ms = routing.timeout_for(&agent, c.work_type.as_deref()).map(|t| t.as_millis().min(i64::MAX as u128) as i64);
                out.claims.push(Claim { wp_id: c.wp_id.clone(), agent, kind, timeout_ms, target: target.key() });
            }
            Decision::Wait { reason, .. } => {
                out.waits.push(Wait { target: (!current).then(|| target.key()), ..wait(reason, WaitAs::Ready) })
            }
            Decision::DeadLetter { detail, .. } => {
                out.waits.push(wait(format!("no route under routing {}: {detail}", routing.config_version), WaitAs::Ready))
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::routing_file::parse;

    const TABLE: &str = r#"version: 1
agents:
  ada:    { roles: [developer], max_in_flight: 1 }
  turing: { roles: [developer], max_in_flight: 2 }
  hopper: { roles: [ops], enabled: false }
  free:   { roles: [coordinator] }
work_types:
  implement: developer
default_agent: free
"#;

    fn table() -> RoutingTable {
        parse(TABLE, "t.yaml").unwrap()
    }

    fn to(agent: &str, wp: &str) -> Candidate {
        let routing = table();
        Candidate {
            wp_id: wp.into(),
            requested_agent: Some(agent.into()),
            work_type: None,
            trigger: None,
            target: Some(format!("explicit/agent:{agent}")),
            routed_by: Some(routing.config_version.clone()),
            lane: None,
            order: (1, 0),
            plan: None,
            delayed_until: None,
            eligible_since: 0.0,
        }
    }

    fn paused(scope: &str, name: &str) -> Paused {
        Paused::of(vec![crate::engine::controls::Pause {
            scope: scope.into(),
            name: name.into(),
            reason: None,
            paused_at: chrono::Utc::now(),
        }])
    }

    #[test]
    fn a_paused_or_full_agent_s_targets_are_not_read_and_others_are() {
        let routing = table();
        let mut agents = AgentsNow { paused: paused("agent", "ada"), ..Default::default() };
        agents.in_flight.insert("turing".into(), 2);
        let open: HashMap<String, i64> = open_targets(&routing, &agents, &Ready::All).into_iter().collect();
        assert!(!open.contains_key("explicit/agent:ada"), "paused: {open:?}");
        assert!(!open.contains_key("explicit/agent:turing"), "full: {open:?}");
        assert!(!open.contains_key("work_type/role:developer"), "every agent of the role is held: {open:?}");
        assert!(!open.contains_key("explicit/agent:hopper"), "disabled: {open:?}");
        assert_eq!(open.get("explicit/agent:free"), Some(&ROUND_LIMIT), "{open:?}");
        assert_eq!(open.get("default/agent:free"), Some(&ROUND_LIMIT), "{open:?}");

        agents.in_flight.insert("turing".into(), 1);
        let open: HashMap<String, i64> = open_targets(&routing, &agents, &Ready::All).into_iter().collect();
        assert_eq!(open.get("work_type/role:developer"), Some(&1), "one slot of turing: {open:?}");
    }

    #[test]
    fn a_freed_slot_opens_only_the_targets_of_its_agent() {
        let routing = table();
        let agents = AgentsNow::default();
        let freed = Ready::Of(["ada".to_string()].into());
        let open: Vec<String> = open_targets(&routing, &agents, &freed).into_iter().map(|(k, _)| k).collect();
        assert_eq!(open, vec!["explicit/agent:ada".to_string(), "work_type/role:developer".to_string()]);
        assert!(open_targets(&routing, &agents, &Ready::None).is_empty());
    }

    #[test]
    fn claims_stop_at_the_cap_and_the_rest_wait_with_the_reason() {
        let routing = table();
        let mut agents = AgentsNow::default();
        let d = decide(&[to("ada", "a1"), to("ada", "a2"), to("free", "f1")], &routing, &mut agents, None);
        assert_eq!(d.claims.iter().map(|c| c.wp_id.as_str()).collect::<Vec<_>>(), ["a1", "f1"]);
        assert_eq!(d.waits.len(), 1);
        assert!(d.waits[0].reason.contains("ada is full"), "{:?}", d.waits[0]);
        assert_eq!(d.waits[0].status, WaitAs::Ready);
        assert_eq!(d.waits[0].held_by, None, "a full agent holds nothing row by row");
    }

    #[test]
    fn a_paused_plan_or_lane_holds_its_work_row_by_row() {
        let routing = table();
        let mut agents = AgentsNow { paused: paused("plan", "nightly"), ..Default::default() };
        let c = Candidate { plan: Some("nightly".into()), ..to("free", "n1") };
        let d = decide(&[c], &routing, &mut agents, None);
        assert!(d.claims.is_empty());
        assert_eq!(d.waits[0].held_by.as_deref(), Some("plan:nightly"));
        assert_eq!(d.waits[0].reason, "paused: plan nightly");

        let mut agents = AgentsNow { paused: paused("lane", "L"), ..Default::default() };
        let c = Candidate { lane: Some("L".into()), ..to("free", "l1") };
        let d = decide(&[c], &routing, &mut agents, None);
        assert_eq!(d.waits[0].held_by.as_deref(), Some("lane:L"));
    }

    #[test]
    fn a_reached_budget_holds_its_plan_row_by_row_and_its_agent_s_targets() {
        let routing = table();
        let mut agents = AgentsNow::default();
        agents.plans_over_budget.insert("nightly".into(), "budget of plan nightly reached: 25.03 of 25.00 USD".into());
        agents.agents_over_budget.insert("ada".into(), "budget of agent ada reached: 3 of 3 USD per day".into());
        let held = Candidate { plan: Some("nightly".into()), ..to("free", "n1") };
        let other = Candidate { plan: Some("daily".into()), ..to("free", "d1") };
        let d = decide(&[held, other, to("ada", "a1")], &routing, &mut agents, None);
        assert_eq!(d.claims.iter().map(|c| c.wp_id.as_str()).collect::<Vec<_>>(), ["d1"]);
        assert_eq!(d.waits[0].held_by.as_deref(), Some("budget:nightly"));
        assert_eq!(d.waits[0].reason, "budget of plan nightly reached: 25.03 of 25.00 USD");
        assert_eq!((d.waits[1].held_by.as_deref(), d.waits[1].reason.as_str()), (None, "budget of agent ada reached: 3 of 3 USD per day"));
        let open: HashMap<String, i64> = open_targets(&routing, &agents, &Ready::All).into_iter().collect();
        assert!(!open.contains_key("explicit/agent:ada"), "{open:?}");
    }

    #[test]
    fn lane_members_after_the_gate_wait_and_are_looked_at_again() {
        let routing = table();
        let mut agents = AgentsNow::default();
        let early = Candidate { lane: Some("L".into()), order: (5, 0), ..to("free", "early") };
        let late = Candidate { lane: Some("M".into()), order: (7, 0), ..to("free", "late") };
        let d = decide(&[early, late], &routing, &mut agents, Some((6, 0)));
        assert_eq!(d.claims.iter().map(|c| c.wp_id.as_str()).collect::<Vec<_>>(), ["early"]);
        assert_eq!(d.gated, ["late"]);
        assert_eq!(d.waits[0].status, WaitAs::Blocked);
    }

    #[test]
    fn delayed_work_waits_until_due_and_stale_routes_are_routed_again() {
        let routing = table();
        let mut agents = AgentsNow::default();
        let delayed = Candidate { delayed_until: Some(4_102_444_800.0), ..to("free", "later") };
        let stale = Candidate {
            requested_agent: None,
            work_type: Some("implement".into()),
            target: Some("explicit/agent:gone".into()),
            routed_by: Some("an-old-version".into()),
            ..to("free", "moved")
        };
        let d = decide(&[delayed, stale], &routing, &mut agents, None);
        assert_eq!(d.waits[0].status, WaitAs::RetryWait);
        assert_eq!(d.waits[0].due, Some(4_102_444_800.0));
        assert!(d.waits[0].reason.starts_with("delayed: not before 2100-01-01"), "{}", d.waits[0].reason);
        assert_eq!(d.claims[0].wp_id, "moved");
        assert_eq!(d.claims[0].target, "work_type/role:developer");
        assert_eq!(d.claims[0].agent, "ada", "least loaded, then by name");
    }
}
