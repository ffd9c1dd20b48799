//! `peer`: BullMQ, the queue users would pick instead, on the bench's own Redis in the shapes of
//! `route` (no-op jobs) and `chains` (flows of 10), so that our figure is read over the peer's
//! from one sitting rather than from someone else's machine. The jobs run in Node.js
//! (`tools/peer/peer.mjs`, BullMQ pinned by its package-lock.json); this side installs it
//! when missing, runs it, and turns its answer into runs of the report.
//!
//! As many worker processes as we run replicas, each with a concurrency of `--batch-size`
//! (the most a replica takes from the stream at once), and as many jobs as our workload's work
//! packages.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::tools::bench::report::{Latency, Run};
use crate::tools::bench::{BenchArgs, Stack};

/// The last line `peer.mjs` prints.
#[derive(Deserialize)]
struct Answer {
    jobs: usize,
    processed: usize,
    unique: usize,
    seconds: f64,
    jobs_per_s: f64,
    latency_us: Vec<u64>,
}

/// Installs BullMQ into `dir` from its package-lock.json when it is not there yet: the same
/// command as `scripts/setup.sh --peer`.
async fn install(dir: &Path) -> anyhow::Result<()> {
    let missing = "the peer workload runs BullMQ under Node.js (20 or later) with npm: install them (scripts/setup.sh does)";
    let node = tokio::process::Command::new("node").arg("--version").output().await.context(missing)?;
    anyhow::ensure!(node.status.success(), "{missing}");
    if dir.join("node_modules/bullmq/package.json").is_file() {
        return Ok(());
    }
    println!("bench: installing BullMQ into {} (npm ci, from its package-lock.json)", dir.display());
    let status = tokio::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .status()
        .await
        .context(missing)?;
    anyhow::ensure!(status.success(), "npm ci in {} failed ({status})", dir.display());
    Ok(())
}

/// One shape: `route` (`n` jobs) or `chains` (`n` flows of 10), on a Redis emptied first.
async fn shape(args: &BenchArgs, stack: &Stack, client: &redis::Client, shape: &str, n: usize) -> anyhow::Result<Run> {
    stack.reset(client).await?;
    let script = args.peer_dir.join("peer.mjs");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(&script)
        .arg(shape)
        .args(["--redis", &stack.redis_url, "--n", &n.to_string(), "--workers", &args.replicas.to_string()])
        .args(["--concurrency", &args.batch_size.to_string(), "--timeout-s", &args.timeout.as_secs().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    // The script ends by itself at its --timeout-s; the margin is for its start and its report.
    let out = tokio::time::timeout(args.timeout + Duration::from_secs(60), cmd.output())
        .await
        .with_context(|| format!("{} {shape} did not end within --timeout and a minute", script.display()))?
        .with_context(|| format!("running node {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "node {} {shape} failed ({}):\n{stdout}", script.display(), out.status);
    let last = stdout.lines().last().unwrap_or_default();
    let a: Answer = serde_json::from_str(last).with_context(|| format!("reading the answer of {}: {last:?}", script.display()))?;
    let latency = Some(Latency::from_us(a.latency_us.into_iter()));
    let mut run = Run {
        workload: format!("bullmq-{shape}"),
        work_packages: a.jobs,
        finished: a.unique,
        seconds: a.seconds,
        wp_per_s: a.jobs_per_s,
        duplicates: a.processed.saturating_sub(a.unique),
        lost: a.jobs.saturating_sub(a.unique),
        ..Default::default()
    };
    // The figures of our own workload of that shape.
    match shape {
        "route" => run.ingest_to_trigger = latency,
        _ => run.completion_to_dispatch = latency,
    }
    Ok(run)
}

/// The shapes of the workloads named beside it (route, chains), or both when neither is.
pub(crate) async fn peer(args: &BenchArgs, stack: &Stack, client: &redis::Client) -> anyhow::Result<Vec<Run>> {
    install(&args.peer_dir).await?;
    let named = |w: &str| args.workloads.iter().any(|x| x == w);
    let both = !named("route") && !named("chains");
    let mut runs = Vec::new();
    if both || named("route") {
        runs.push(shape(args, stack, client, "route", args.route).await?);
    }
    if both || named("chains") {
        runs.push(shape(args, stack, client, "chains", args.chains).await?);
    }
    Ok(runs)
}
