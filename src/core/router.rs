//! The routing decision, pure: (entry fields, routing table, in-flight counts) → where it
//! goes and why. No I/O; everything it needs is passed in.

use crate::core::entry::excerpt;
use crate::core::routing_file::{RoutingTable, TriggerTarget};

pub(crate) struct RouteRequest<'a> {
    pub agent_id: Option<&'a str>,
    pub work_type: Option<&'a str>,
    pub trigger: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum RouteKind {
    Explicit,
    WorkType,
    Trigger,
    Default,
}

impl RouteKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            RouteKind::Explicit => "explicit",
            RouteKind::WorkType => "work_type",
            RouteKind::Trigger => "trigger",
            RouteKind::Default => "default",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterReason {
    UnknownAgent,
    Unroutable,
}

impl DeadLetterReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadLetterReason::UnknownAgent => "unknown_agent",
            DeadLetterReason::Unroutable => "unroutable",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    Dispatch {
        agent: String,
        kind: RouteKind,
        reason: String,
    },
    /// Routable, but every candidate is full or disabled: wait as `ready`.
    Wait {
        kind: RouteKind,
        candidates: Vec<String>,
        reason: String,
    },
    DeadLetter {
        reason: DeadLetterReason,
        detail: String,
    },
}

fn load_of(table: &RoutingTable, agent: &str, in_flight: &impl Fn(&str) -> u32) -> String {
    let cap = table.agents.get(agent).and_then(|a| a.max_in_flight).map(|c| c.to_string()).unwrap_or_else(|| "∞".into());
    format!("{agent} {}/{cap}", in_flight(agent))
}

/// What a dispatch round knows about each agent besides the routing file: its work in flight,
/// and why it may take none now (paused, out of rate-limit tokens; v1.4).
pub(crate) trait AgentState {
    fn in_flight(&self, agent: &str) -> u32;
    fn held(&self, _agent: &str) -> Option<String> {
        None
    }
}

impl<F: Fn(&str) -> u32> AgentState for F {
    fn in_flight(&self, agent: &str) -> u32 {
        self(agent)
    }
}

/// One named agent: dispatch unless it is disabled, held or at its cap.
fn to_agent(table: &RoutingTable, agent: &str, kind: RouteKind, why: String, state: &impl AgentState) -> Decision {
    let in_flight = &|a: &str| state.in_flight(a);
    let Some(spec) = table.agents.get(agent) else {
        // Config validation guarantees trigger and default targets exist; only an explicit
        // agent_id can get here, and route() checks that first.
        return Decision::DeadLetter {
            reason: DeadLetterReason::UnknownAgent,
            detail: format!("agent {} is not in the registry", excerpt(agent)),
        };
    };
    let load = load_of(table, agent, in_flight);
    if !spec.enabled {
        return Decision::Wait { kind, candidates: vec![agent.to_string()], reason: format!("{why}: agent {agent} is disabled") };
    }
    if spec.max_in_flight.is_some_and(|cap| in_flight(agent) >= cap) {
        return Decision::Wait { kind, candidates: vec![agent.to_string()], reason: format!("{why}: agent {agent} is full ({load})") };
    }
    // Said as is ("rate limit of ada: next slot in 12 s"): the hold is the agent's, whatever
    // the route.
    if let Some(held) = state.held(agent) {
        return Decision::Wait { kind, candidates: vec![agent.to_string()], reason: held };
    }
    Decision::Dispatch { agent: agent.to_string(), kind, reason: format!("{why} -> {agent} ({load})") }
}

/// The enabled, unheld agent of `role` with the fewest in flight below its cap; ties by name.
fn to_role(table: &RoutingTable, role: &str, kind: RouteKind, why: String, state: &impl AgentState) -> Decision {
    let in_flight = &|a: &str| state.in_flight(a);
    let all: Vec<(&str, &crate::core::routing_file::AgentSpec)> = table.agents_with_role(role).collect();
    let loads = all.iter().map(|(n, _)| load_of(table, n, in_flight)).collect::<Vec<_>>().join(", ");
    let best = all
        .iter()
        .filter(|(_, a)| a.enabled)
        .filter(|(n, a)| a.max_in_flight.is_none_or(|cap| in_flight(n) < cap))
        .filter(|(n, _)| state.held(n).is_none())
        .min_by_key(|(n, _)| (in_flight(n), *n));
    match best {
        Some((agent, _)) => {
            Decision::Dispatch { agent: agent.to_string(), kind, reason: format!("{why} -> role {role} -> {agent} (candidates: {loads})") }
        }
        None => {
            let disabled: Vec<&str> = all.iter().filter(|(_, a)| !a.enabled).map(|(n, _)| *n).collect();
            let held: Vec<String> = all.iter().filter_map(|(n, _)| state.held(n)).collect();
            let state = if disabled.len() == all.len() {
                format!("disabled: {}", disabled.join(", "))
            } else if held.is_empty() {
                format!("full or disabled: {loads}")
            } else {
                format!("full, disabled or held: {loads}; {}", held.join("; "))
            };
            Decision::Wait {
                kind,
                candidates: all.iter().map(|(n, _)| n.to_string()).collect(),
                reason: format!("{why} -> role {role}: every agent is {state}"),
            }
        }
    }
}

/// Where the router sends a work package, decided once when it arrives (and again only under
/// a new routing file): one agent or one role, and by which rule. Which agent of a role gets it
/// is decided at dispatch, by the load of that moment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Target {
    pub kind: RouteKind,
    pub dest: Dest,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Dest {
    Agent(String),
    Role(String),
}

impl From<&TriggerTarget> for Dest {
    fn from(t: &TriggerTarget) -> Dest {
        match t {
            TriggerTarget::Role(r) => Dest::Role(r.clone()),
            TriggerTarget::Agent(a) => Dest::Agent(a.clone()),
        }
    }
}

impl Target {
    /// The stored form, `work_type/role:developer`: the key of the index of ready work.
    pub fn key(&self) -> String {
        let (what, name) = match &self.dest {
            Dest::Agent(a) => ("agent", a),
            Dest::Role(r) => ("role", r),
        };
        format!("{}/{what}:{name}", self.kind.as_str())
    }

    /// The inverse of `key`; None for anything else.
    pub fn parse(key: &str) -> Option<Target> {
        let (kind, dest) = key.split_once('/')?;
        let kind = match kind {
            "explicit" => RouteKind::Explicit,
            "work_type" => RouteKind::WorkType,
            "trigger" => RouteKind::Trigger,
            "default" => RouteKind::Default,
            _ => return None,
        };
        let dest = match dest.split_once(':')? {
            ("agent", a) => Dest::Agent(a.to_string()),
            ("role", r) => Dest::Role(r.to_string()),
            _ => return None,
        };
        Some(Target { kind, dest })
    }

    /// The agents it may go to under `table`, by name.
    pub fn agents<'t>(&self, table: &'t RoutingTable) -> Vec<&'t str> {
        match &self.dest {
            Dest::Agent(a) => table.agents.get_key_value(a).map(|(k, _)| k.as_str()).into_iter().collect(),
            Dest::Role(r) => table.agents_with_role(r).map(|(n, _)| n).collect(),
        }
    }
}

/// Why a request goes to a target, in the words of the routing file.
fn why(req: &RouteRequest, target: &Target, table: &RoutingTable) -> String {
    fn nonempty(v: Option<&str>) -> Option<&str> {
        v.filter(|s| !s.is_empty())
    }
    match target.kind {
        RouteKind::Explicit => format!("agent_id {}", excerpt(nonempty(req.agent_id).unwrap_or_default())),
        RouteKind::WorkType => format!("work_type {:?}", req.work_type.unwrap_or_default()),
        RouteKind::Trigger => {
            let (what, subject) = match nonempty(req.trigger) {
                Some(t) => ("trigger", t),
                None => ("work_type", nonempty(req.work_type).unwrap_or_default()),
            };
            match table.triggers.iter().find(|t| t.pattern.is_match(subject)) {
                Some(rule) => format!("{what} {} matches pattern {:?}", excerpt(subject), rule.pattern.as_str()),
                None => format!("{what} {} (matched a pattern of an earlier routing file)", excerpt(subject)),
            }
        }
        RouteKind::Default => "no other route applies: default_agent".into(),
    }
}

/// Where `req` goes under `table`, whatever the agents' load: the routing file's rules in
/// order (contract "Routing"), or why it cannot be routed at all.
pub(crate) fn resolve(req: &RouteRequest, table: &RoutingTable) -> Result<Target, (DeadLetterReason, String)> {
    let nonempty = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(str::to_string);
    let (agent_id, work_type, trigger) = (nonempty(req.agent_id), nonempty(req.work_type), nonempty(req.trigger));

    if let Some(agent) = agent_id {
        if !table.agents.contains_key(&agent) {
            let known = table.agents.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
            return Err((
                DeadLetterReason::UnknownAgent,
                format!(
                    "agent_id {} is not in the routing registry (known agents: {known}); fix the agent_id or add the agent to the routing file",
                    excerpt(&agent)
                ),
            ));
        }
        return Ok(Target { kind: RouteKind::Explicit, dest: Dest::Agent(agent) });
    }
    if let Some(wt) = &work_type
        && let Some(role) = table.work_types.get(wt)
    {
        return Ok(Target { kind: RouteKind::WorkType, dest: Dest::Role(role.clone()) });
    }
    if let Some(subject) = trigger.as_ref().or(work_type.as_ref())
        && let Some(rule) = table.triggers.iter().find(|t| t.pattern.is_match(subject))
    {
        return Ok(Target { kind: RouteKind::Trigger, dest: Dest::from(&rule.target) });
    }
    if let Some(default) = &table.default_agent {
        return Ok(Target { kind: RouteKind::Default, dest: Dest::Agent(default.clone()) });
    }
    let given: Vec<String> = [("work_type", &work_type), ("trigger", &trigger)]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", excerpt(v))))
        .collect();
    Err((
        DeadLetterReason::Unroutable,
        format!(
            "no route for {}: no agent_id, no work_types mapping, no trigger pattern matched, and no default_agent; add a mapping, a pattern or a default_agent to the routing file (or send agent_id)",
            if given.is_empty() { "an entry with none of agent_id, work_type, trigger".to_string() } else { given.join(", ") }
        ),
    ))
}

/// Which agent of `target` takes it now, given the agents' state, or why it waits.
pub(crate) fn dispatch_to(req: &RouteRequest, target: &Target, table: &RoutingTable, state: &impl AgentState) -> Decision {
    let why = why(req, target, table);
    match &target.dest {
        Dest::Agent(a) => to_agent(table, a, target.kind, why, state),
        Dest::Role(r) => to_role(table, r, target.kind, why, state),
    }
}

/// The whole decision: where it goes under `table`, and to which agent now.
pub fn route(req: &RouteRequest, table: &RoutingTable, state: &impl AgentState) -> Decision {
    match resolve(req, table) {
        Ok(target) => dispatch_to(req, &target, table, state),
        Err((reason, detail)) => Decision::DeadLetter { reason, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::routing_file::parse;
    use std::collections::HashMap;

    const TABLE: &str = r#"version: 1
agents:
  dolly:  { roles: [coordinator] }
  ada:    { roles: [developer], max_in_flight: 2 }
  turing: { roles: [developer, reviewer] }
  hopper: { roles: [ops], enabled: false }
work_types:
  implement: developer
  code_review: reviewer
  deploy: ops
triggers:
  - { pattern: "github.pull_request.*", role: reviewer }
  - { pattern: "alert.*", agent: hopper }
  - { pattern: "impl*", agent: dolly }
default_agent: dolly
"#;

    fn table() -> RoutingTable {
        parse(TABLE, "t.yaml").unwrap()
    }

    fn go(agent_id: Option<&str>, work_type: Option<&str>, trigger: Option<&str>, loads: &[(&str, u32)]) -> Decision {
        let loads: HashMap<String, u32> = loads.iter().map(|(a, n)| (a.to_string(), *n)).collect();
        route(&RouteRequest { agent_id, work_type, trigger }, &table(), &|a: &str| loads.get(a).copied().unwrap_or(0))
    }

    fn dispatched(d: &Decision) -> (&str, RouteKind) {
        match d {
            Decision::Dispatch { agent, kind, .. } => (agent.as_str(), *kind),
            other => panic!("expected a dispatch, got {other:?}"),
        }
    }

    #[test]
    fn explicit_agent_wins_over_everything() {
        let d = go(Some("dolly"), Some("implement"), Some("alert.x"), &[]);
        assert_eq!(dispatched(&d), ("dolly", RouteKind::Explicit));
    }

    #[test]
    fn unknown_explicit_agent_is_dead_lettered_not_rerouted() {
        match go(Some("../x"), Some("implement"), None, &[]) {
            Decision::DeadLetter { reason, detail } => {
                assert_eq!(reason, DeadLetterReason::UnknownAgent);
                assert!(detail.contains("\"../x\"") && detail.contains("ada"), "{detail}");
            }
            d => panic!("{d:?}"),
        }
        let huge = "z".repeat(10_000);
        match go(Some(&huge), None, None, &[]) {
            Decision::DeadLetter { detail, .. } => assert!(detail.len() < 400, "hostile names are cut in messages"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn empty_agent_id_is_absent() {
        assert_eq!(dispatched(&go(Some(""), Some("code_review"), None, &[])), ("turing", RouteKind::WorkType));
    }

    #[test]
    fn work_type_beats_trigger_and_picks_least_loaded_with_ties_by_name() {
        assert_eq!(dispatched(&go(None, Some("implement"), Some("alert.x"), &[])), ("ada", RouteKind::WorkType));
        assert_eq!(dispatched(&go(None, Some("implement"), None, &[("ada", 1)])), ("turing", RouteKind::WorkType));
        assert_eq!(dispatched(&go(None, Some("implement"), None, &[("ada", 1), ("turing", 1)])), ("ada", RouteKind::WorkType));
    }

    #[test]
    fn a_full_agent_is_skipped_and_all_full_waits() {
        assert_eq!(dispatched(&go(None, Some("implement"), None, &[("ada", 2), ("turing", 5)])), ("turing", RouteKind::WorkType));
        match go(Some("ada"), None, None, &[("ada", 2)]) {
            Decision::Wait { kind, candidates, reason } => {
                assert_eq!(kind, RouteKind::Explicit);
                assert_eq!(candidates, vec!["ada"]);
                assert!(reason.contains("full") && reason.contains("2/2"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
    }

    struct Held(&'static [&'static str]);
    impl AgentState for Held {
        fn in_flight(&self, _: &str) -> u32 {
            0
        }
        fn held(&self, agent: &str) -> Option<String> {
            self.0.contains(&agent).then(|| format!("paused: agent {agent}"))
        }
    }

    #[test]
    fn held_agents_are_passed_over_and_say_why() {
        let t = table();
        let req = |agent_id, work_type| RouteRequest { agent_id, work_type, trigger: None };
        assert_eq!(dispatched(&route(&req(None, Some("implement")), &t, &Held(&["ada"]))), ("turing", RouteKind::WorkType));
        match route(&req(Some("ada"), None), &t, &Held(&["ada"])) {
            Decision::Wait { reason, .. } => assert_eq!(reason, "paused: agent ada"),
            d => panic!("{d:?}"),
        }
        match route(&req(None, Some("implement")), &t, &Held(&["ada", "turing"])) {
            Decision::Wait { reason, .. } => assert!(reason.contains("paused: agent ada; paused: agent turing"), "{reason}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn disabled_agents_wait() {
        match go(None, Some("deploy"), None, &[]) {
            Decision::Wait { kind, reason, .. } => {
                assert_eq!(kind, RouteKind::WorkType);
                assert!(reason.contains("disabled"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        assert!(matches!(go(Some("hopper"), None, None, &[]), Decision::Wait { .. }));
    }

    #[test]
    fn triggers_first_match_role_or_agent() {
        assert_eq!(dispatched(&go(None, None, Some("github.pull_request.opened"), &[])), ("turing", RouteKind::Trigger));
        match go(None, None, Some("alert.disk"), &[]) {
            Decision::Wait { kind, .. } => assert_eq!(kind, RouteKind::Trigger),
            d => panic!("alert.* goes to disabled hopper: {d:?}"),
        }
    }

    #[test]
    fn unmapped_work_type_is_the_trigger_subject() {
        assert_eq!(dispatched(&go(None, Some("implementation"), None, &[])), ("dolly", RouteKind::Trigger));
        // With a trigger given, the trigger is the subject, not the work_type.
        assert_eq!(dispatched(&go(None, Some("implementation"), Some("nothing"), &[])), ("dolly", RouteKind::Default));
    }

    #[test]
    fn default_then_unroutable() {
        assert_eq!(dispatched(&go(None, None, Some("nothing.matches"), &[])), ("dolly", RouteKind::Default));
        assert_eq!(dispatched(&go(None, None, None, &[])), ("dolly", RouteKind::Default));
        let no_default = parse("version: 1\nagents:\n  ada: { roles: [dev] }\n", "t.yaml").unwrap();
        match route(&RouteRequest { agent_id: None, work_type: Some("x"), trigger: None }, &no_default, &|_: &str| 0) {
            Decision::DeadLetter { reason, detail } => {
                assert_eq!(reason, DeadLetterReason::Unroutable);
                assert!(detail.contains("work_type=\"x\"") && detail.contains("default_agent"), "{detail}");
            }
            d => panic!("{d:?}"),
        }
    }
}
