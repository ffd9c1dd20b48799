//! The dispatch controls' workloads (contract v1.4): what priorities and fair share cost, and
//! how long a small plan waits behind a large backlog. Both run against agents with a
//! `max_in_flight`, so that work waits as `ready` and the round's choice matters.
//!
//! - `capped`: independent work packages with no control field, to capped agents that
//!   complete at once.
//! - `capped-controls`: the same number, spread over 10 plans with three priorities.
//! - `fair-wait`: a backlog of one plan, then a plan of 10: from sending the small plan to the
//!   first trigger of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::{store, streams};
use crate::tools::bench::load::{self, AgentLog, Wp};
use crate::tools::bench::report::{FairWait, Run};
use crate::tools::bench::{BenchArgs, Stack, rss_mb, throughput};

/// The capped agents of the bench's routing file, and the work type that goes to them.
pub(crate) const CAPPED: [&str; 4] = ["c1", "c2", "c3", "c4"];
pub(crate) const CAPPED_TYPE: &str = "capped-build";

fn capped(n: usize, with_controls: bool) -> Vec<Wp> {
    (0..n)
        .map(|i| {
            let mut fields = vec![("work_type", CAPPED_TYPE.to_string())];
            let wp_id = if with_controls {
                fields.push(("priority", (i % 3).to_string()));
                format!("p{}.{i}", i % 10)
            } else {
                format!("r{i}")
            };
            Wp { wp_id, fields, prereqs: Vec::new() }
        })
        .collect()
}

/// `capped` or `capped-controls`: throughput from the first send to the last completion.
pub(crate) async fn capped_run(args: &BenchArgs, stack: &Stack, client: &redis::Client, with_controls: bool) -> anyhow::Result<Run> {
    stack.reset(client).await?;
    let mut procs = stack.replicas(args, client, "bench-capped").await?;
    let token = CancellationToken::new();
    let log = Arc::new(Mutex::new(AgentLog::default()));
    let agents = load::agents(client, &CAPPED, true, &log, &token);
    let wps = capped(args.capped, with_controls);
    let mut con = streams::blocking(client).await?;
    let (_, first) = load::produce(&mut con, &stack.names.incoming, &wps, None, &token).await?;
    let n = wps.len();
    load::wait_for(&log, args.timeout, |l| l.completed.len() >= n).await;
    token.cancel();
    let workload = if with_controls { "capped-controls" } else { "capped" };
    let mut run = Run { workload: workload.into(), work_packages: n, ..Default::default() };
    run.peak_rss_mb = rss_mb(&procs);
    procs.stop_all(Duration::from_secs(10)).await;
    for a in agents {
        let _ = a.await;
    }
    let l = log.lock().unwrap_or_else(|p| p.into_inner());
    (run.finished, run.seconds, run.wp_per_s) = throughput(&l.completed, first);
    run.ingest_to_trigger = Some(l.ingest_to_trigger());
    run.duplicates = l.duplicates();
    run.lost = n - run.finished;
    Ok(run)
}

/// `fair-wait`: `args.capped` work packages of plan `big` are sent and stored (all but the
/// capped agents' slots waiting as `ready`), then the agents start and 10 of plan `small` are
/// sent; measures from sending
/// those to the first trigger of one, and waits for all 10. The backlog is not drained: only
/// the small plan counts.
pub(crate) async fn fair_wait(args: &BenchArgs, stack: &Stack, client: &redis::Client) -> anyhow::Result<Run> {
    stack.reset(client).await?;
    let mut procs = stack.replicas(args, client, "bench-fair").await?;
    let token = CancellationToken::new();
    let log = Arc::new(Mutex::new(AgentLog::default()));
    let big: Vec<Wp> = (0..args.capped)
        .map(|i| Wp { wp_id: format!("big.{i}"), fields: vec![("work_type", CAPPED_TYPE.into())], prereqs: Vec::new() })
        .collect();
    let small: Vec<Wp> =
        (0..10).map(|i| Wp { wp_id: format!("small.{i}"), fields: vec![("work_type", CAPPED_TYPE.into())], prereqs: Vec::new() }).collect();
    let mut con = streams::blocking(client).await?;
    load::produce(&mut con, &stack.names.incoming, &big, None, &token).await?;
    let pool = store::connect(&stack.database_url, 1).await?;
    let deadline = tokio::time::Instant::now() + args.timeout;
    let backlog = loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages").fetch_one(&pool).await?;
        let ready: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE status = 'ready'").fetch_one(&pool).await?;
        if stored >= big.len() as i64 || tokio::time::Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The agents start only now, so that all but the first slots' worth of the backlog waits as
    // `ready` when the small plan comes.
    let agents = load::agents(client, &CAPPED, true, &log, &token);
    let (_, sent) = load::produce(&mut con, &stack.names.incoming, &small, None, &token).await?;
    let seen = load::wait_for(&log, args.timeout, |l| l.seen.keys().filter(|w| w.starts_with("small.")).count() >= small.len()).await;
    let first_small =
        log.lock().unwrap_or_else(|p| p.into_inner()).seen.iter().filter(|(w, _)| w.starts_with("small.")).map(|(_, at)| *at).min();
    token.cancel();
    let mut run = Run { workload: "fair-wait".into(), work_packages: small.len(), ..Default::default() };
    run.peak_rss_mb = rss_mb(&procs);
    procs.stop_all(Duration::from_secs(10)).await;
    for a in agents {
        let _ = a.await;
    }
    pool.close().await;
    let l = log.lock().unwrap_or_else(|p| p.into_inner());
    let small_seen: Vec<u64> = l.seen.iter().filter(|(w, _)| w.starts_with("small.")).map(|(_, at)| *at).collect();
    run.finished = small_seen.len();
    // The small plan's own figures: from its send to its last trigger.
    run.seconds = small_seen.iter().max().map_or(0.0, |t| t.saturating_sub(sent) as f64 / 1e6);
    run.wp_per_s = run.finished as f64 / run.seconds.max(1e-6);
    run.duplicates = l.duplicates();
    run.lost = if seen { 0 } else { small.len() - run.finished };
    let first_dispatch_s = first_small.map_or(0.0, |t| t.saturating_sub(sent) as f64 / 1e6);
    run.fair_wait = Some(FairWait { backlog_ready: backlog.max(0) as usize, first_dispatch_s });
    Ok(run)
}
