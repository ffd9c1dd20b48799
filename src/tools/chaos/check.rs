//! The invariants a chaos run must keep, checked from what the fake agents saw, from
//! PostgreSQL and from the Redis streams.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

/// What the harness submitted.
#[derive(Default)]
pub(crate) struct Submitted {
    pub wp_ids: Vec<String>,
    /// lane -> wp_ids in submission (= stream) order.
    pub lanes: HashMap<String, Vec<String>>,
    /// (wp, dependency)
    pub deps: Vec<(String, String)>,
    /// wp_ids of the bad entries sent on purpose.
    pub bad: HashSet<String>,
}

/// What the fake agents saw: per dispatch_id, when it arrived and when its completion was sent.
#[derive(Default)]
pub(crate) struct AgentLog {
    pub received: HashMap<String, (String, Instant)>,
    pub completed: HashMap<String, Instant>,
    /// Triggers delivered to an agent again (its own PEL after a Redis restart).
    pub redelivered: u64,
    /// The stream entry ids of the triggers received, per dispatch_id: two ids are a
    /// duplicate dispatch even once retention has trimmed both.
    pub trigger_entries: HashMap<String, HashSet<String>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Invariant {
    pub name: &'static str,
    pub held: bool,
    pub detail: String,
}

fn inv(name: &'static str, broken: &[String], ok: String) -> Invariant {
    let held = broken.is_empty();
    let detail =
        if held { ok } else { format!("{} broken: {}", broken.len(), broken.iter().take(5).cloned().collect::<Vec<_>>().join("; ")) };
    Invariant { name, held, detail }
}

pub(crate) struct Observed {
    /// wp_id -> (status, attempts)
    pub states: HashMap<String, (String, i32)>,
    /// dispatch_id -> number of trigger entries carrying it
    pub trigger_counts: HashMap<String, usize>,
    /// (reason, wp_id field) of each dead letter
    pub deadletters: Vec<(String, String)>,
}

/// Work packages retention removed: gone from PostgreSQL, with a completion an agent reported.
/// Retention removes only finished work and the fake agents fail nothing, so each counts as
/// completed, after as many attempts as it had dispatches. Returns how many.
pub(crate) fn count_removed(sub: &Submitted, log: &AgentLog, obs: &mut Observed) -> usize {
    let mut dispatches: HashMap<&str, (i32, bool)> = HashMap::new();
    for (d, (wp, _)) in &log.received {
        let e = dispatches.entry(wp.as_str()).or_default();
        e.0 += 1;
        e.1 |= log.completed.contains_key(d);
    }
    let mut n = 0;
    for w in &sub.wp_ids {
        if let (None, Some((attempts, true))) = (obs.states.get(w), dispatches.get(w.as_str())) {
            obs.states.insert(w.clone(), ("completed".into(), *attempts));
            n += 1;
        }
    }
    n
}

pub fn check(sub: &Submitted, log: &AgentLog, obs: &Observed) -> Vec<Invariant> {
    let mut out = Vec::new();

    let lost: Vec<String> = sub
        .wp_ids
        .iter()
        .filter(|w| obs.states.get(*w).map(|(s, _)| s.as_str()) != Some("completed"))
        .map(|w| format!("{w} is {}", obs.states.get(w).map(|(s, _)| s.as_str()).unwrap_or("missing")))
        .collect();
    out.push(inv(
        "0 lost: every work package completed",
        &lost,
        format!("{} of {} completed", sub.wp_ids.len() - lost.len(), sub.wp_ids.len()),
    ));

    let dups: Vec<String> = obs.trigger_counts.iter().filter(|(_, n)| **n > 1).map(|(d, n)| format!("{d} x{n}")).collect();
    out.push(inv("0 duplicate dispatch_ids", &dups, format!("{} trigger entries, all distinct", obs.trigger_counts.len())));

    let twice: Vec<String> = sub
        .wp_ids
        .iter()
        .filter_map(|w| obs.states.get(w).filter(|(_, a)| *a != 1).map(|(_, a)| format!("{w} took {a} attempts")))
        .collect();
    out.push(inv("exactly once: one dispatch per work package", &twice, "every work package dispatched once".into()));

    let first_seen = |wp: &str| log.received.iter().filter(|(_, (w, _))| w == wp).map(|(_, (_, t))| *t).min();
    let done_at = |wp: &str| log.received.iter().filter(|(_, (w, _))| w == wp).filter_map(|(d, _)| log.completed.get(d)).min().copied();
    let mut order = Vec::new();
    for (wp, dep) in &sub.deps {
        if let (Some(start), Some(done)) = (first_seen(wp), done_at(dep))
            && start < done
        {
            order.push(format!("{wp} started before its dependency {dep} completed"));
        }
    }
    for (lane, wps) in &sub.lanes {
        for pair in wps.windows(2) {
            if let (Some(start), Some(done)) = (first_seen(&pair[1]), done_at(&pair[0]))
                && start < done
            {
                order.push(format!("lane {lane}: {} started before {} completed", pair[1], pair[0]));
            }
        }
    }
    out.push(inv("dependency and lane order", &order, format!("{} edges and {} lanes in order", sub.deps.len(), sub.lanes.len())));

    let unexpected: Vec<String> =
        obs.deadletters.iter().filter(|(_, wp)| !sub.bad.contains(wp)).map(|(r, wp)| format!("{r} for {wp:?}")).collect();
    let dead_wps: HashSet<&str> = obs.deadletters.iter().map(|(_, w)| w.as_str()).collect();
    let missing: Vec<String> =
        sub.bad.iter().filter(|b| !dead_wps.contains(b.as_str())).map(|b| format!("bad entry {b} not dead-lettered")).collect();
    let all: Vec<String> = unexpected.into_iter().chain(missing).collect();
    out.push(inv(
        "dead letters only for the bad inputs",
        &all,
        format!("{} bad inputs, {} dead letters", sub.bad.len(), obs.deadletters.len()),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(states: &[(&str, &str, i32)], triggers: &[(&str, usize)]) -> Observed {
        Observed {
            states: states.iter().map(|(w, s, a)| (w.to_string(), (s.to_string(), *a))).collect(),
            trigger_counts: triggers.iter().map(|(d, n)| (d.to_string(), *n)).collect(),
            deadletters: vec![("invalid".into(), "bad-1".into())],
        }
    }

    #[test]
    fn each_invariant_can_break() {
        let sub = Submitted {
            wp_ids: vec!["a".into(), "b".into()],
            lanes: HashMap::from([("L".into(), vec!["a".into(), "b".into()])]),
            deps: vec![],
            bad: HashSet::from(["bad-1".into()]),
        };
        let t0 = Instant::now();
        let later = t0 + std::time::Duration::from_millis(10);
        let mut log = AgentLog::default();
        log.received.insert("a:1".into(), ("a".into(), t0));
        log.completed.insert("a:1".into(), later);
        log.received.insert("b:1".into(), ("b".into(), later + std::time::Duration::from_millis(1)));
        let good = check(&sub, &log, &observed(&[("a", "completed", 1), ("b", "completed", 1)], &[("a:1", 1), ("b:1", 1)]));
        assert!(good.iter().all(|i| i.held), "{good:?}");

        // Removed by retention after an agent completed it: completed; never seen: lost.
        let mut gone = observed(&[("b", "completed", 1)], &[("a:1", 1), ("b:1", 1)]);
        assert_eq!(count_removed(&sub, &log, &mut gone), 1);
        assert!(check(&sub, &log, &gone).iter().all(|i| i.held));
        let mut unseen = AgentLog::default();
        unseen.received.insert("a:1".into(), ("a".into(), t0));
        let mut lost = observed(&[("b", "completed", 1)], &[]);
        assert_eq!(count_removed(&sub, &unseen, &mut lost), 0, "received, never completed: not removed but lost");

        let bad = check(&sub, &log, &observed(&[("a", "completed", 2), ("b", "blocked", 0)], &[("a:1", 2)]));
        let broken: Vec<&str> = bad.iter().filter(|i| !i.held).map(|i| i.name).collect();
        assert_eq!(broken.len(), 3, "lost, duplicate, exactly once: {bad:?}");

        // b started before a completed.
        log.received.insert("b:1".into(), ("b".into(), t0));
        let order = check(&sub, &log, &observed(&[("a", "completed", 1), ("b", "completed", 1)], &[]));
        assert!(!order.iter().find(|i| i.name.contains("order")).unwrap().held);
    }
}
