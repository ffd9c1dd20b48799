//! `held-backlog`: how soon an agent's next step starts while other agents' backlogs are held
//! (issue 18). Agent `held` is paused and `full` has `max_in_flight: 1` with one work package
//! that never completes; each gets `--held` work packages. Agent `free` gets paced chains of 10
//! twice: first with no backlog (the baseline), then behind the held one. Reports `free`'s
//! completion->dispatch both times, so the ratio shows; when `free`'s work stops moving it ends
//! and says so (starved) instead of waiting out `--timeout`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use crate::engine::controls::{self, PauseScope};
use crate::engine::{store, streams};
use crate::tools::bench::load::{self, AgentLog, Wp, now_us};
use crate::tools::bench::report::{HeldBacklog, Latency, Run};
use crate::tools::bench::{BenchArgs, Stack, rss_mb};

/// The agents of the bench's routing file this workload uses.
pub(crate) const HELD: &str = "held";
pub(crate) const FULL: &str = "full";
pub(crate) const FREE: &str = "free";

/// The one fairness key of all the workload's work, as work submitted without a plan shares
/// the empty one: fair share then cannot hide what the held backlog costs (with a key per plan,
/// today's rounds read a share of every key and `free`'s would go first), and `free`'s steps
/// come after the backlog in the key's order.
const KEY: &str = "bench-held";

/// How long `free`'s work may make no progress before the run calls it starved. Today's engine
/// at 1,000 WP/s had a completion->dispatch p99.9 of 456 ms, so a chain of 10 that still moves
/// takes a few seconds at worst; ten seconds without a single dispatch is no longer slowness.
const STALL: Duration = Duration::from_secs(10);

/// `n` work packages for `free` in chains of 10 (the chains workload's shape, sent by agent).
fn free_chains(n: usize, prefix: &str) -> Vec<Wp> {
    let mut wps = load::chains(n / 10, prefix);
    for w in &mut wps {
        w.fields.retain(|(k, _)| *k != "work_type");
        w.fields.extend([("agent_id", FREE.into()), ("fairness_key", KEY.into())]);
    }
    wps
}

/// What one phase of paced chains for `free` saw.
struct Phase {
    latency: Latency,
    completed: usize,
    dispatched: usize,
    first_sent: u64,
    /// Nothing was dispatched for `STALL` while some of the phase's work had not been.
    starved: bool,
    /// From the first send until the phase ended.
    waited_s: f64,
}

/// Sends `wps` (chains of 10) at `rate` WP/s, a whole chain at a time so that each step is
/// stored before the step it waits for completes, then waits until `free` completed them all,
/// or made no progress for `STALL`, or `timeout`.
async fn phase(
    con: &mut MultiplexedConnection,
    incoming: &str,
    wps: &[Wp],
    rate: u32,
    log: &Arc<Mutex<AgentLog>>,
    timeout: Duration,
    token: &CancellationToken,
) -> anyhow::Result<Phase> {
    let started = tokio::time::Instant::now();
    let first_sent = now_us();
    load::produce(con, incoming, wps, Some(load::Pace { rate, per_send: 10 }), token).await?;
    let ids: Vec<&str> = wps.iter().map(|w| w.wp_id.as_str()).collect();
    let count = |l: &AgentLog| {
        (ids.iter().filter(|w| l.seen.contains_key(**w)).count(), ids.iter().filter(|w| l.completed.contains_key(**w)).count())
    };
    let deadline = started + timeout;
    let (mut last_progress, mut dispatched_before) = (tokio::time::Instant::now(), usize::MAX);
    let (dispatched, completed, starved) = loop {
        let (dispatched, completed) = count(&log.lock().unwrap_or_else(|p| p.into_inner()));
        if dispatched != dispatched_before {
            (last_progress, dispatched_before) = (tokio::time::Instant::now(), dispatched);
        }
        let now = tokio::time::Instant::now();
        if completed >= wps.len() || now >= deadline || token.is_cancelled() {
            break (dispatched, completed, false);
        }
        if now.duration_since(last_progress) >= STALL {
            break (dispatched, completed, true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let waited_s = now_us().saturating_sub(first_sent) as f64 / 1e6;
    let l = log.lock().unwrap_or_else(|p| p.into_inner());
    // As dag: from the completion of a step's prerequisite to seeing the step's trigger.
    let latency = load::completion_to_dispatch(wps, &l);
    Ok(Phase { latency, completed, dispatched, first_sent, starved, waited_s })
}

/// Work packages of `prefixes` by status and wait reason: what the report shows of
/// the backlog, and of `free`'s work when it starved. A diagnosis, so a failing query (the
/// engine may rename a column) leaves it empty instead of failing the run.
async fn statuses(pool: &sqlx::PgPool, prefixes: &[&str]) -> BTreeMap<String, i64> {
    let patterns: Vec<String> = prefixes.iter().map(|p| format!("{p}%")).collect();
    let rows: Vec<(String, Option<String>, i64)> =
        sqlx::query_as("SELECT status, wait_reason, count(*) FROM work_packages WHERE wp_id LIKE ANY($1) GROUP BY status, wait_reason")
            .bind(&patterns)
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    rows.into_iter().map(|(s, r, n)| (r.map_or(s.clone(), |r| format!("{s}: {r}")), n)).collect()
}

pub(crate) async fn held_backlog(args: &BenchArgs, stack: &Stack, client: &redis::Client) -> anyhow::Result<Run> {
    anyhow::ensure!(args.free >= 10, "--free must be at least 10 (chains of 10)");
    stack.reset(client).await?;
    let pool = store::connect(&stack.database_url, 2).await?;
    // As an operator would (the CLI's `pause` and the admin API write the same row), before any
    // of its work exists.
    controls::pause(&pool, PauseScope::Agent, HELD, Some("bench held-backlog")).await?;
    let mut procs = stack.replicas(args, client, "bench-held").await?;
    let token = CancellationToken::new();
    let free_log = Arc::new(Mutex::new(AgentLog::default()));
    let held_log = Arc::new(Mutex::new(AgentLog::default()));
    let mut agents = load::agents(client, &[FREE], true, &free_log, &token);
    // Agents that never report: `full` keeps its one work package forever, `held` should see none.
    agents.extend(load::agents(client, &[HELD, FULL], false, &held_log, &token));
    let mut con = streams::blocking(client).await?;
    let incoming = &stack.names.incoming;

    let base = free_chains(args.free, "base.");
    let baseline = phase(&mut con, incoming, &base, args.free_rate, &free_log, args.timeout, &token).await?;

    // The held backlog, as fast as Redis takes it; the first of `full`'s to be routed fills it.
    let backlog: Vec<Wp> = (0..args.held)
        .flat_map(|i| {
            [HELD, FULL].map(|a| Wp {
                wp_id: format!("{a}.{i}"),
                fields: vec![("agent_id", a.to_string()), ("fairness_key", KEY.into())],
                prereqs: Vec::new(),
            })
        })
        .collect();
    load::produce(&mut con, incoming, &backlog, None, &token).await?;
    let expected = (base.len() + backlog.len()) as i64;
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages").fetch_one(&pool).await?;
        let full_in = !held_log.lock().unwrap_or_else(|p| p.into_inner()).seen.is_empty();
        if stored >= expected && full_in {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            procs.stop_all(Duration::from_secs(10)).await;
            anyhow::bail!(
                "held-backlog: {stored} of {expected} work packages stored{} within --timeout {}; logs in {}",
                if full_in { "" } else { ", and none dispatched to `full`" },
                humantime::format_duration(args.timeout),
                stack.dir.display()
            );
        }
        // A count over the whole backlog each time: not so often that it slows the loading.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let backlog_statuses = statuses(&pool, &["held.", "full."]).await;

    let free = free_chains(args.free, "free.");
    let held = phase(&mut con, incoming, &free, args.free_rate, &free_log, args.timeout, &token).await?;
    let free_statuses = if held.completed < free.len() { statuses(&pool, &["free."]).await } else { BTreeMap::new() };
    token.cancel();
    let peak_rss_mb = rss_mb(&procs);
    procs.stop_all(Duration::from_secs(10)).await;
    for a in agents {
        let _ = a.await;
    }
    pool.close().await;

    let (fl, hl) = (free_log.lock().unwrap_or_else(|p| p.into_inner()), held_log.lock().unwrap_or_else(|p| p.into_inner()));
    let last = free.iter().filter_map(|w| fl.completed.get(&w.wp_id)).copied().max().unwrap_or(held.first_sent);
    let seconds = last.saturating_sub(held.first_sent) as f64 / 1e6;
    let dispatched_to = |agent: &str| hl.seen.keys().filter(|w| w.starts_with(&format!("{agent}."))).count();
    Ok(Run {
        workload: "held-backlog".into(),
        work_packages: free.len(),
        finished: held.completed,
        seconds,
        wp_per_s: held.completed as f64 / seconds.max(1e-6),
        // Starved, the few that went say nothing of the rest.
        completion_to_dispatch: (!held.starved).then_some(held.latency),
        duplicates: fl.duplicates() + hl.duplicates(),
        lost: free.len() - held.completed,
        peak_rss_mb,
        held_backlog: Some(HeldBacklog {
            backlog: backlog.len(),
            backlog_statuses,
            baseline: baseline.latency,
            baseline_finished: baseline.completed,
            baseline_work_packages: base.len(),
            baseline_starved: baseline.starved,
            dispatched: held.dispatched,
            starved: held.starved,
            waited_s: held.waited_s,
            free_statuses,
            held_dispatched: dispatched_to(HELD),
            full_dispatched: dispatched_to(FULL),
        }),
        ..Default::default()
    })
}
