//! The invariants a chaos run must keep, checked twice: from the client history (what the
//! fake agents ran and reported, in the order they did it, as Jepsen checks a system from its
//! clients' history) and from what the orchestrator keeps (PostgreSQL, the Redis streams).

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
    /// (v1.6) Work packages the operator tried to cancel, and (once the run is over) every
    /// one a cancel reached: each may end cancelled, or completed when it finished first.
    pub cancel_roots: HashSet<String>,
    pub cancelled: HashSet<String>,
}

/// One thing an agent did.
pub(crate) enum Op {
    /// Ran the trigger of stream entry `entry` (an entry delivered again is not run again).
    Run { entry: String },
    /// Sent the report of a run with this outcome, stamped before sending; logged once Redis
    /// took it.
    Report { outcome: String },
}

pub(crate) struct Event {
    pub at: Instant,
    pub dispatch: String,
    pub wp: String,
    pub op: Op,
}

/// The client history: every trigger the fake agents ran and every report they sent, in order.
#[derive(Default)]
pub(crate) struct AgentLog {
    pub history: Vec<Event>,
    /// Triggers delivered to an agent again (its own PEL after a Redis restart).
    pub redelivered: u64,
}

/// What the history says per work package, computed once.
#[derive(Default)]
struct Views<'a> {
    /// wp -> when an agent first ran one of its dispatches.
    first_run: HashMap<&'a str, Instant>,
    /// wp -> when an agent first reported one of its dispatches completed.
    first_done: HashMap<&'a str, Instant>,
    /// dispatch_id -> the outcomes reported for it.
    outcomes: HashMap<&'a str, HashSet<&'a str>>,
    /// dispatch_id -> the trigger entries run for it.
    entries: HashMap<&'a str, HashSet<&'a str>>,
    /// wp -> its dispatch_ids the agents ran.
    dispatches: HashMap<&'a str, HashSet<&'a str>>,
}

impl AgentLog {
    pub(crate) fn run(&mut self, dispatch: &str, wp: &str, entry: &str) {
        self.history.push(Event { at: Instant::now(), dispatch: dispatch.into(), wp: wp.into(), op: Op::Run { entry: entry.into() } });
    }

    pub(crate) fn report(&mut self, at: Instant, dispatch: &str, wp: &str, outcome: &str) {
        self.history.push(Event { at, dispatch: dispatch.into(), wp: wp.into(), op: Op::Report { outcome: outcome.into() } });
    }

    fn views(&self) -> Views<'_> {
        let mut v = Views::default();
        for e in &self.history {
            match &e.op {
                Op::Run { entry } => {
                    v.first_run.entry(&e.wp).or_insert(e.at);
                    v.entries.entry(&e.dispatch).or_default().insert(entry);
                    v.dispatches.entry(&e.wp).or_default().insert(&e.dispatch);
                }
                Op::Report { outcome } => {
                    let t = v.first_done.entry(&e.wp).or_insert(e.at);
                    *t = (*t).min(e.at);
                    v.outcomes.entry(&e.dispatch).or_default().insert(outcome);
                }
            }
        }
        v
    }

    /// The stream entry ids of the triggers run, per dispatch_id: two ids are a duplicate
    /// dispatch even once retention has trimmed both.
    pub(crate) fn trigger_entries(&self) -> HashMap<String, HashSet<String>> {
        let mut out: HashMap<String, HashSet<String>> = HashMap::new();
        for e in &self.history {
            if let Op::Run { entry } = &e.op {
                out.entry(e.dispatch.clone()).or_default().insert(entry.clone());
            }
        }
        out
    }

    /// Work packages an agent reported completed (the fake agents complete every run).
    pub(crate) fn completed_wps(&self) -> HashSet<&str> {
        self.history.iter().filter(|e| matches!(e.op, Op::Report { .. })).map(|e| e.wp.as_str()).collect()
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Invariant {
    pub name: &'static str,
    /// `agents` (the client history) or `orchestrator` (its tables and streams).
    pub by: &'static str,
    pub held: bool,
    pub detail: String,
}

fn inv(name: &'static str, by: &'static str, broken: &[String], ok: String) -> Invariant {
    let held = broken.is_empty();
    let detail =
        if held { ok } else { format!("{} broken: {}", broken.len(), broken.iter().take(5).cloned().collect::<Vec<_>>().join("; ")) };
    Invariant { name, by, held, detail }
}

pub(crate) struct Observed {
    /// wp_id -> (status, attempts)
    pub states: HashMap<String, (String, i32)>,
    /// dispatch_id -> number of trigger entries carrying it
    pub trigger_counts: HashMap<String, usize>,
    /// (reason, wp_id field) of each dead letter
    pub deadletters: Vec<(String, String)>,
    /// wp_id -> when PostgreSQL first recorded it dispatched and completed (its event history,
    /// `clock_timestamp()` of the change), in microseconds; absent once retention removed it.
    pub first_dispatched: HashMap<String, i64>,
    pub first_completed: HashMap<String, i64>,
}

/// Work packages retention removed: gone from PostgreSQL, with a completion an agent reported.
/// Retention removes only finished work and the fake agents fail nothing, so each counts as
/// completed, after as many attempts as it had dispatches. Returns how many.
pub(crate) fn count_removed(sub: &Submitted, log: &AgentLog, obs: &mut Observed) -> usize {
    let v = log.views();
    let mut n = 0;
    for w in &sub.wp_ids {
        if obs.states.contains_key(w) || !v.first_done.contains_key(w.as_str()) {
            continue;
        }
        let attempts = v.dispatches.get(w.as_str()).map_or(1, |d| d.len() as i32);
        obs.states.insert(w.clone(), ("completed".into(), attempts));
        n += 1;
    }
    n
}

/// Pairs (earlier, later) that must be in order: each lane in submission order, and each
/// dependency before its dependent. A cancelled earlier one lets its lane go on at once, and
/// its dependents are cancelled, so it orders nothing.
fn ordered_pairs(sub: &Submitted) -> Vec<(&str, &str, String)> {
    let mut pairs = all_pairs(sub);
    pairs.retain(|(before, _, _)| !sub.cancelled.contains(*before));
    pairs
}

fn all_pairs(sub: &Submitted) -> Vec<(&str, &str, String)> {
    let mut pairs: Vec<(&str, &str, String)> = sub
        .deps
        .iter()
        .map(|(wp, dep)| (dep.as_str(), wp.as_str(), format!("{wp} started before its dependency {dep} completed")))
        .collect();
    for (lane, wps) in &sub.lanes {
        for pair in wps.windows(2) {
            pairs.push((&pair[0], &pair[1], format!("lane {lane}: {} started before {} completed", pair[1], pair[0])));
        }
    }
    pairs
}

/// The invariants from the client history alone.
pub fn check_history(sub: &Submitted, log: &AgentLog) -> Vec<Invariant> {
    let v = log.views();
    let mut out = Vec::new();
    let unrun: Vec<String> = sub
        .wp_ids
        .iter()
        .filter(|w| !v.first_done.contains_key(w.as_str()) && !sub.cancelled.contains(*w))
        .map(|w| if v.first_run.contains_key(w.as_str()) { format!("{w} run, never reported") } else { format!("{w} never run") })
        .collect();
    out.push(inv(
        "every work package run and reported",
        "agents",
        &unrun,
        format!("{} of {} run and reported", sub.wp_ids.len() - unrun.len(), sub.wp_ids.len()),
    ));

    let twice = v.entries.values().filter(|e| e.len() > 1).count();
    let differing: Vec<String> = v
        .outcomes
        .iter()
        .filter(|(_, o)| o.len() > 1)
        .map(|(d, o)| format!("{d} run {} times with outcomes {o:?}", v.entries.get(d).map_or(0, HashSet::len)))
        .collect();
    out.push(inv(
        "no dispatch_id run twice with different outcomes",
        "agents",
        &differing,
        format!("{} dispatch_ids run, {twice} of them from two trigger entries", v.entries.len()),
    ));

    let early: Vec<String> = ordered_pairs(sub)
        .into_iter()
        .filter(|(before, after, _)| match (v.first_run.get(after), v.first_done.get(before)) {
            (Some(start), Some(done)) => start < done,
            (Some(_), None) => true,
            _ => false,
        })
        .map(|(_, _, what)| what)
        .collect();
    out.push(inv(
        "lane and dependency order as the agents saw it",
        "agents",
        &early,
        format!("{} edges and {} lanes: each started after what it waits for was reported", sub.deps.len(), sub.lanes.len()),
    ));
    out
}

/// Why each work package not completed is not, in a few words per kind, for the lost
/// invariant's detail: whether the orchestrator ever stored it, and what the agents saw.
fn lost_kinds(lost: &[&String], obs: &Observed, v: &Views<'_>) -> String {
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for w in lost {
        let status = obs.states.get(*w).map(|(s, _)| s.as_str());
        let kind = match (status, v.first_run.contains_key(w.as_str()), v.first_done.contains_key(w.as_str())) {
            (None, false, _) => "never stored (its entry lost)".to_string(),
            (Some("dispatched"), false, _) => "dispatched, never run (its trigger lost)".to_string(),
            (Some("dispatched"), true, true) => "dispatched, run and reported (the report lost)".to_string(),
            (s, run, reported) => format!("{} (run: {run}, reported: {reported})", s.unwrap_or("missing")),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort();
    kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}

/// The invariants from the orchestrator's tables and streams.
pub fn check(sub: &Submitted, log: &AgentLog, obs: &Observed) -> Vec<Invariant> {
    let v = log.views();
    let mut out = Vec::new();

    let lost: Vec<&String> = sub
        .wp_ids
        .iter()
        .filter(|w| match obs.states.get(*w).map(|(s, _)| s.as_str()) {
            Some("completed") => false,
            // Removed by retention once finished, or cancelled: what an operator asked for.
            None | Some("cancelled") => !sub.cancelled.contains(*w),
            Some(_) => true,
        })
        .collect();
    let mut lost_detail: Vec<String> =
        lost.iter().map(|w| format!("{w} is {}", obs.states.get(*w).map(|(s, _)| s.as_str()).unwrap_or("missing"))).collect();
    if !lost.is_empty() {
        lost_detail.insert(0, format!("by kind: {}", lost_kinds(&lost, obs, &v)));
    }
    let mut lost_inv = inv(
        "0 lost: every work package completed",
        "orchestrator",
        &lost_detail,
        format!(
            "{} of {} completed or cancelled by the operator ({} cancelled)",
            sub.wp_ids.len() - lost.len(),
            sub.wp_ids.len(),
            sub.cancelled.iter().filter(|w| obs.states.get(*w).is_some_and(|(s, _)| s == "cancelled")).count()
        ),
    );
    if !lost.is_empty() {
        lost_inv.detail = format!("{} lost; {}", lost.len(), lost_detail.iter().take(6).cloned().collect::<Vec<_>>().join("; "));
    }
    out.push(lost_inv);

    let dups: Vec<String> = obs.trigger_counts.iter().filter(|(_, n)| **n > 1).map(|(d, n)| format!("{d} x{n}")).collect();
    out.push(inv("0 duplicate dispatch_ids", "orchestrator", &dups, format!("{} trigger entries, all distinct", obs.trigger_counts.len())));

    let twice: Vec<String> = sub
        .wp_ids
        .iter()
        .filter_map(|w| {
            let cancelled = sub.cancelled.contains(w);
            obs.states.get(w).filter(|(_, a)| if cancelled { *a > 1 } else { *a != 1 }).map(|(_, a)| format!("{w} took {a} attempts"))
        })
        .collect();
    out.push(inv("exactly once: one dispatch per work package", "orchestrator", &twice, "every work package dispatched once".into()));

    let mut compared = 0;
    let early: Vec<String> = ordered_pairs(sub)
        .into_iter()
        .filter(|(before, after, _)| match (obs.first_dispatched.get(*after), obs.first_completed.get(*before)) {
            (Some(start), Some(done)) => {
                compared += 1;
                start < done
            }
            (Some(_), None) => obs.states.contains_key(*before),
            _ => false,
        })
        .map(|(_, _, what)| what.replace("started", "dispatched"))
        .collect();
    out.push(inv(
        "lane and dependency order in PostgreSQL's history",
        "orchestrator",
        &early,
        format!("{compared} pairs still in the history, each dispatched after what it waits for completed"),
    ));

    let unexpected: Vec<String> =
        obs.deadletters.iter().filter(|(_, wp)| !sub.bad.contains(wp)).map(|(r, wp)| format!("{r} for {wp:?}")).collect();
    let dead_wps: HashSet<&str> = obs.deadletters.iter().map(|(_, w)| w.as_str()).collect();
    let missing: Vec<String> =
        sub.bad.iter().filter(|b| !dead_wps.contains(b.as_str())).map(|b| format!("bad entry {b} not dead-lettered")).collect();
    let all: Vec<String> = unexpected.into_iter().chain(missing).collect();
    out.push(inv(
        "dead letters only for the bad inputs",
        "orchestrator",
        &all,
        format!("{} bad inputs, {} dead letters", sub.bad.len(), obs.deadletters.len()),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn observed(states: &[(&str, &str, i32)], triggers: &[(&str, usize)]) -> Observed {
        Observed {
            states: states.iter().map(|(w, s, a)| (w.to_string(), (s.to_string(), *a))).collect(),
            trigger_counts: triggers.iter().map(|(d, n)| (d.to_string(), *n)).collect(),
            deadletters: vec![("invalid".into(), "bad-1".into())],
            first_dispatched: HashMap::new(),
            first_completed: HashMap::new(),
        }
    }

    fn sub() -> Submitted {
        Submitted {
            wp_ids: vec!["a".into(), "b".into()],
            lanes: HashMap::from([("L".into(), vec!["a".into(), "b".into()])]),
            deps: vec![],
            bad: HashSet::from(["bad-1".into()]),
            ..Submitted::default()
        }
    }

    /// a runs and completes, then b runs and completes.
    fn good_log() -> AgentLog {
        let t0 = Instant::now();
        let mut log = AgentLog::default();
        log.history.push(Event { at: t0, dispatch: "a:1".into(), wp: "a".into(), op: Op::Run { entry: "1-0".into() } });
        log.report(t0 + Duration::from_millis(10), "a:1", "a", "done");
        log.history.push(Event {
            at: t0 + Duration::from_millis(11),
            dispatch: "b:1".into(),
            wp: "b".into(),
            op: Op::Run { entry: "2-0".into() },
        });
        log.report(t0 + Duration::from_millis(12), "b:1", "b", "done");
        log
    }

    #[test]
    fn each_invariant_of_the_tables_can_break() {
        let (sub, log) = (sub(), good_log());
        let good = check(&sub, &log, &observed(&[("a", "completed", 1), ("b", "completed", 1)], &[("a:1", 1), ("b:1", 1)]));
        assert!(good.iter().all(|i| i.held), "{good:?}");

        // Removed by retention after an agent completed it: completed; never seen: lost.
        let mut gone = observed(&[("b", "completed", 1)], &[("a:1", 1), ("b:1", 1)]);
        assert_eq!(count_removed(&sub, &log, &mut gone), 1);
        assert!(check(&sub, &log, &gone).iter().all(|i| i.held));
        let mut unseen = AgentLog::default();
        unseen.run("a:1", "a", "1-0");
        let mut lost = observed(&[("b", "completed", 1)], &[]);
        assert_eq!(count_removed(&sub, &unseen, &mut lost), 0, "run, never reported: not removed but lost");

        let bad = check(&sub, &log, &observed(&[("a", "completed", 2), ("b", "blocked", 0)], &[("a:1", 2)]));
        let broken: Vec<&str> = bad.iter().filter(|i| !i.held).map(|i| i.name).collect();
        assert_eq!(broken.len(), 3, "lost, duplicate, exactly once: {bad:?}");

        // PostgreSQL recorded b dispatched before a completed.
        let mut order = observed(&[("a", "completed", 1), ("b", "completed", 1)], &[]);
        order.first_completed.insert("a".into(), 20);
        order.first_dispatched.insert("b".into(), 10);
        let order = check(&sub, &log, &order);
        assert!(!order.iter().find(|i| i.name.contains("order")).unwrap().held);
    }

    #[test]
    fn each_invariant_of_the_history_can_break() {
        let sub = sub();
        assert!(check_history(&sub, &good_log()).iter().all(|i| i.held));

        // b never reported; b run before a was reported; a:1 run from a second entry with another outcome.
        let t0 = Instant::now();
        let mut log = AgentLog::default();
        log.history.push(Event { at: t0, dispatch: "b:1".into(), wp: "b".into(), op: Op::Run { entry: "2-0".into() } });
        log.history.push(Event { at: t0, dispatch: "a:1".into(), wp: "a".into(), op: Op::Run { entry: "1-0".into() } });
        log.report(t0 + Duration::from_millis(5), "a:1", "a", "done");
        log.run("a:1", "a", "3-0");
        log.report(Instant::now(), "a:1", "a", "done\0with a NUL");
        let broken: Vec<&str> = check_history(&sub, &log).iter().filter(|i| !i.held).map(|i| i.name).collect();
        assert_eq!(broken.len(), 3, "{broken:?}");
    }

    /// (v1.6) A cancelled work package may end cancelled, never run, or completed, and lets
    /// its lane go on; dispatched twice, or left open, it still breaks the invariants.
    #[test]
    fn a_cancelled_work_package_is_exempt_only_from_completing() {
        let mut sub = sub();
        sub.cancelled.insert("a".into());
        // a cancelled before it ran; b ran at once, its lane going on.
        let t0 = Instant::now();
        let mut log = AgentLog::default();
        log.run("b:1", "b", "2-0");
        log.report(t0 + Duration::from_millis(1), "b:1", "b", "done");
        assert!(check_history(&sub, &log).iter().all(|i| i.held), "{:?}", check_history(&sub, &log));
        let ok = check(&sub, &log, &observed(&[("a", "cancelled", 0), ("b", "completed", 1)], &[("b:1", 1)]));
        assert!(ok.iter().all(|i| i.held), "{ok:?}");
        let ok = check(&sub, &log, &observed(&[("a", "cancelled", 1), ("b", "completed", 1)], &[("a:1", 1), ("b:1", 1)]));
        assert!(ok.iter().all(|i| i.held), "dispatched once before the cancel: {ok:?}");

        let bad = check(&sub, &log, &observed(&[("a", "cancelled", 2), ("b", "completed", 1)], &[("a:1", 2), ("b:1", 1)]));
        let broken: Vec<&str> = bad.iter().filter(|i| !i.held).map(|i| i.name).collect();
        assert_eq!(broken.len(), 2, "duplicate, exactly once: {bad:?}");
        let open = check(&sub, &log, &observed(&[("a", "dispatched", 1), ("b", "completed", 1)], &[]));
        assert!(!open.iter().find(|i| i.name.contains("lost")).unwrap().held, "{open:?}");
        // b cancelled by no one: lost.
        let lost = check(&sub, &log, &observed(&[("a", "cancelled", 0), ("b", "cancelled", 1)], &[]));
        assert!(!lost.iter().find(|i| i.name.contains("lost")).unwrap().held, "{lost:?}");
    }
}
