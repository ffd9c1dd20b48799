//! (v1.6) Approvals and events under chaos: twice a second a step that waits for an approval
//! or an event, and an agent's step that depends on it. A stand-in operator approves the
//! waiting approvals (straight to PostgreSQL, like the CLI) and a stand-in CI sends the events
//! (to `ge:work:events`), every other one before its step is even submitted, so that it must be
//! kept. Their invariants: every wait ends, none goes to an agent, and its dependent runs only
//! after it. The dependents join the main load's work packages, so they are checked as run
//! exactly once too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::check::{Invariant, Observed, Submitted};
use crate::engine::settings::Names;
use crate::engine::streams::{self, Endpoint, MasterConnection};
use crate::engine::waits;

/// The waiting steps submitted: wp_id -> the event key it waits for (None: an approval), and
/// (dependent, step) pairs.
#[derive(Default)]
pub(crate) struct Waits {
    pub steps: HashMap<String, Option<String>>,
    pub after: Vec<(String, String)>,
}

async fn connect(endpoint: &Endpoint, token: &CancellationToken) -> Option<MasterConnection> {
    loop {
        match MasterConnection::connect(endpoint).await {
            Ok(c) => return Some(c),
            Err(_) if !token.is_cancelled() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_) => return None,
        }
    }
}

/// Submits the waiting steps and their dependents until `token` is cancelled.
/// With `confirm` (the HA topology), each entry is sent again until a Redis replica has it.
pub(crate) async fn load(
    endpoint: Endpoint,
    submitted: Arc<Mutex<Submitted>>,
    record: Arc<Mutex<Waits>>,
    confirm: bool,
    token: CancellationToken,
) {
    let names = Names::default();
    let Some(mut con) = connect(&endpoint, &token).await else { return };
    let mut n = 0u64;
    while !token.is_cancelled() {
        n += 1;
        let step = format!("w{n}.step");
        let after = format!("w{n}.after");
        let key = n.is_multiple_of(2).then(|| format!("chaos:{n}"));
        let mut fields = vec![("wp_id".to_string(), step.clone())];
        match &key {
            Some(k) => {
                if n.is_multiple_of(4) {
                    // The event first: kept until its step comes to wait for it.
                    send(&mut con, &names.events, k).await;
                }
                fields.extend([("wait_for".into(), "event".into()), ("wait_key".into(), k.clone())]);
            }
            None => fields.push(("wait_for".into(), "approval".into())),
        }
        let dependent =
            vec![("wp_id".to_string(), after.clone()), ("work_type".into(), "build".into()), ("depends_on".into(), step.clone())];
        for entry in [fields, dependent] {
            while !super::sent(&mut con, &names.incoming, &entry, confirm).await && !token.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        {
            let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
            r.steps.insert(step.clone(), key);
            r.after.push((after.clone(), step));
        }
        submitted.lock().unwrap_or_else(|p| p.into_inner()).wp_ids.push(after);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn send(con: &mut MasterConnection, events: &str, key: &str) {
    let _ = streams::xadd(con, events, None, &[("key", key), ("conclusion", "success")]).await;
}

/// The stand-in operator and CI: every 300 ms, approves what waits for an approval and sends
/// the event of what waits for one, until `token` is cancelled. Errors (a restarting Redis or
/// PostgreSQL) are tried again at the next turn.
pub(crate) async fn decide(endpoint: Endpoint, database_url: String, token: CancellationToken) {
    let names = Names::default();
    let Ok(pool) = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_lazy(&database_url) else { return };
    let Some(mut con) = connect(&endpoint, &token).await else { return };
    let mut sent: HashMap<String, std::time::Instant> = HashMap::new();
    while !token.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waiting: Vec<(String, String, Option<String>)> =
            match sqlx::query_as("SELECT wp_id, wait_for, wait_key FROM work_packages WHERE status = 'waiting' LIMIT 200")
                .fetch_all(&pool)
                .await
            {
                Ok(w) => w,
                Err(_) => continue,
            };
        for (wp, wait_for, key) in waiting {
            match (wait_for.as_str(), key) {
                ("approval", _) => {
                    let _ = waits::approve(&pool, &wp, "chaos", Some("approved under chaos")).await;
                }
                // An event lost with a Redis restart is sent again a few seconds later.
                (_, Some(k)) if sent.get(&k).is_none_or(|at| at.elapsed() > Duration::from_secs(3)) => {
                    send(&mut con, &names.events, &k).await;
                    sent.insert(k, std::time::Instant::now());
                }
                _ => {}
            }
        }
    }
}

/// The invariants of the waits, from what the orchestrator keeps.
pub(crate) fn check(w: &Waits, obs: &Observed) -> Vec<Invariant> {
    let inv = |name: &'static str, broken: Vec<String>, ok: String| Invariant {
        name,
        by: "orchestrator",
        held: broken.is_empty(),
        detail: if broken.is_empty() {
            ok
        } else {
            format!("{} broken: {}", broken.len(), broken.into_iter().take(5).collect::<Vec<_>>().join("; "))
        },
    };
    let approvals = w.steps.values().filter(|k| k.is_none()).count();
    let unended: Vec<String> = w
        .steps
        .keys()
        .filter(|s| obs.states.get(*s).map(|(st, _)| st.as_str()) != Some("completed"))
        .map(|s| format!("{s} is {}", obs.states.get(s).map(|(st, _)| st.as_str()).unwrap_or("missing")))
        .collect();
    let dispatched: Vec<String> = w
        .steps
        .keys()
        .filter(|s| obs.first_dispatched.contains_key(*s) || obs.states.get(*s).is_some_and(|(_, a)| *a != 0))
        .map(|s| format!("{s} was dispatched to an agent"))
        .collect();
    let early: Vec<String> = w
        .after
        .iter()
        .filter(|(after, step)| match (obs.first_dispatched.get(after), obs.first_completed.get(step)) {
            (Some(start), Some(done)) => start < done,
            (Some(_), None) => true,
            _ => false,
        })
        .map(|(after, step)| format!("{after} dispatched before {step} ended its wait"))
        .collect();
    vec![
        inv(
            "every wait ended, by its approval or its event",
            unended,
            format!("{} waits ({approvals} approvals, {} events) all completed", w.steps.len(), w.steps.len() - approvals),
        ),
        inv("no waiting step went to an agent", dispatched, "none dispatched".into()),
        inv("a wait's dependent ran only after the wait ended", early, format!("{} dependents in order", w.after.len())),
    ]
}
