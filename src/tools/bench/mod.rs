//! `ge-orchestrator bench`: throughput, latency, takeover and memory of real replica
//! processes, beside the Redis ceiling measured in the same run. Prints a table and, with
//! `--json`, writes the figures for tooling. The method is in BENCHMARKS.md.

mod ceiling;
mod controls;
mod held;
pub(crate) mod load;
mod peer;
mod report;
mod traces;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::engine::settings::Names;
use crate::engine::{store, streams};
use crate::tools::localstack::{LocalPostgres, LocalRedis, PostgresOptions, RedisOptions};
use crate::tools::procs::{self, ReplicaProcs};

use load::{AgentLog, now_us};
use report::{Run, Takeover};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Use this Redis instead of starting one. Its data is wiped between workloads.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Use this PostgreSQL database instead of starting one. Its work packages are wiped.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Workloads to run, in this order; `chains`, `held-backlog`, `peer` and `traces` run only when named.
    #[arg(long, value_delimiter = ',', default_value = "route,ceiling,dag,dag-paced,takeover,capped,capped-controls,fair-wait")]
    pub workloads: Vec<String>,
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Work packages of the route and ceiling workloads.
    #[arg(long, default_value_t = 100_000)]
    pub route: usize,
    /// Plans of 10 work packages in the dag workloads.
    #[arg(long, default_value_t = 1000)]
    pub dag_plans: usize,
    /// Chains of 10 work packages in the chains workload, written before the replicas start.
    #[arg(long, default_value_t = 2000)]
    pub chains: usize,
    /// Work packages of the capped, capped-controls and fair-wait workloads (the backlog).
    #[arg(long, default_value_t = 100_000)]
    pub capped: usize,
    /// Work packages per second of dag-paced and of the takeover load.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// How long the takeover load runs; the kill comes at a third of it.
    #[arg(long, default_value = "9s", value_parser = humantime::parse_duration)]
    pub takeover_load: Duration,
    /// Entries per XREADGROUP, for the replicas and the ceiling alike.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Longest wait for one workload to finish.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Work packages of each held agent in held-backlog: as many for the paused one and for
    /// the full one.
    #[arg(long, default_value_t = 100_000)]
    pub held: usize,
    /// Work packages of the free agent in each phase of held-backlog, in chains of 10.
    #[arg(long, default_value_t = 2000)]
    pub free: usize,
    /// Work packages per second of the free agent in held-backlog.
    #[arg(long, default_value_t = 100)]
    pub free_rate: u32,
    /// The peer workload's Node.js package (its script and package-lock.json).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/peer"))]
    pub peer_dir: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const AGENTS: [&str; 4] = ["b1", "b2", "b3", "b4"];
const ROUTING: &str = "version: 1
agents:
  b1: { roles: [worker] }
  b2: { roles: [worker] }
  b3: { roles: [worker] }
  b4: { roles: [worker] }
  c1: { roles: [capped], max_in_flight: 50 }
  c2: { roles: [capped], max_in_flight: 50 }
  c3: { roles: [capped], max_in_flight: 50 }
  c4: { roles: [capped], max_in_flight: 50 }
  held: { roles: [held] }
  full: { roles: [full], max_in_flight: 1 }
  free: { roles: [free] }
work_types:
  build: worker
  capped-build: capped
default_agent: b1
";

struct Stack {
    /// The replicas run with the default names too.
    names: Names,
    redis: Option<LocalRedis>,
    postgres: Option<LocalPostgres>,
    redis_url: String,
    database_url: String,
    dir: PathBuf,
    config: PathBuf,
}

impl Stack {
    async fn start(args: &BenchArgs) -> anyhow::Result<Stack> {
        let dir = std::env::temp_dir().join(format!("ge-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("routing.yaml");
        std::fs::write(&config, ROUTING)?;
        let (redis, redis_url) = match &args.redis_url {
            Some(u) => (None, u.clone()),
            None => {
                let r = LocalRedis::start(RedisOptions::default()).await?;
                let u = r.url();
                (Some(r), u)
            }
        };
        let (postgres, database_url) = match &args.database_url {
            Some(u) => (None, u.clone()),
            None => {
                // Large enough for the working set of the largest backlog (chains at 200k), as
                // a production server's would be.
                let p = LocalPostgres::start(PostgresOptions { shared_buffers_mb: Some(1024), ..PostgresOptions::default() }).await?;
                let u = p.create_database("bench").await?;
                (Some(p), u)
            }
        };
        Ok(Stack { names: Names::default(), redis, postgres, redis_url, database_url, dir, config })
    }

    /// Empties Redis and the work-package tables, so each workload starts alike.
    async fn reset(&self, client: &redis::Client) -> anyhow::Result<()> {
        let mut con = client.get_multiplexed_async_connection().await?;
        streams::flush_all(&mut con).await?;
        let pool = store::connect(&self.database_url, 1).await?;
        sqlx::query("TRUNCATE work_packages, work_package_deps, work_package_events, dispatch_outbox, dispatch_pauses, agent_rate_buckets")
            .execute(&pool)
            .await?;
        pool.close().await;
        Ok(())
    }

    /// Starts the replicas and waits until each has joined the group.
    async fn replicas(&self, args: &BenchArgs, client: &redis::Client, name: &str) -> anyhow::Result<ReplicaProcs> {
        self.replicas_with(args, client, name, &[]).await
    }

    /// `replicas`, with `extra` in their environment.
    async fn replicas_with(
        &self,
        args: &BenchArgs,
        client: &redis::Client,
        name: &str,
        extra: &[(String, String)],
    ) -> anyhow::Result<ReplicaProcs> {
        let mut env = vec![
            ("REDIS_URL".into(), self.redis_url.clone()),
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("GE_ROUTING_CONFIG".into(), self.config.to_string_lossy().into_owned()),
        ];
        env.extend(extra.iter().cloned());
        let batch = args.batch_size.to_string();
        let flags = ["--block", "1s", "--http-addr", "off", "--log-format", "json", "--batch-size", batch.as_str()];
        let mut procs = ReplicaProcs::new(env, &flags, self.dir.clone(), name)?;
        for slot in 0..args.replicas {
            procs.spawn(slot)?;
        }
        let mut con = client.get_multiplexed_async_connection().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let joined = streams::group_consumers(&mut con, &self.names.incoming, &self.names.group).await.unwrap_or_default();
            if (0..procs.len()).all(|s| joined.iter().any(|(n, _)| n == procs.name(s))) {
                return Ok(procs);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "replicas did not join the group within 30 s; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// (how many, seconds, per second) of the events in `done`, timed from `first`.
fn throughput(done: &std::collections::HashMap<String, u64>, first: u64) -> (usize, f64, f64) {
    let last = done.values().copied().max().unwrap_or(first);
    let seconds = last.saturating_sub(first) as f64 / 1e6;
    (done.len(), seconds, done.len() as f64 / seconds.max(1e-6))
}

fn rss_mb(procs: &ReplicaProcs) -> Vec<f64> {
    (0..procs.len()).map(|s| procs.peak_rss(s).map(|b| b as f64 / 1_048_576.0).unwrap_or(0.0)).collect()
}

/// Waits until the agents have reported all `n` work packages and PostgreSQL records them as
/// completed, or `timeout`; returns how many it records as completed.
async fn wait_completed(log: &Arc<Mutex<AgentLog>>, pool: &sqlx::PgPool, n: usize, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + timeout;
    load::wait_for(log, timeout, |l| l.completed.len() >= n).await;
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE status = 'completed'").fetch_one(pool).await?;
        if done >= n as i64 || tokio::time::Instant::now() >= deadline {
            return Ok(done.max(0) as usize);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Route or ceiling: `n` independent work packages sent as fast as Redis takes them, timed from
/// the first send to the last trigger seen. A `variant` (the traces workload) names the run,
/// may give each entry a trace context and the replicas an environment of their own.
async fn route(
    args: &BenchArgs,
    stack: &Stack,
    client: &redis::Client,
    ceiling: bool,
    variant: Option<&traces::Variant>,
) -> anyhow::Result<Run> {
    stack.reset(client).await?;
    let token = CancellationToken::new();
    let mut procs = None;
    let mut workers = Vec::new();
    if ceiling {
        for i in 0..args.replicas {
            let agents = AGENTS.iter().map(|a| a.to_string()).collect();
            workers.push(tokio::spawn(ceiling::consumer(
                client.clone(),
                stack.names.incoming.clone(),
                format!("ceiling-{i}"),
                agents,
                args.batch_size,
                token.clone(),
            )));
        }
    } else {
        procs = Some(stack.replicas_with(args, client, "bench-route", variant.map_or(&[][..], |v| v.env.as_slice())).await?);
    }
    let log = Arc::new(Mutex::new(AgentLog::default()));
    let agents = load::agents(client, &AGENTS, false, &log, &token);
    let mut wps = load::independent(args.route, "r");
    if variant.is_some_and(|v| v.traced) {
        for (i, w) in wps.iter_mut().enumerate() {
            w.fields.push(("traceparent", traces::traceparent(i)));
        }
    }
    let mut con = streams::blocking(client).await?;
    let (_, first) = load::produce(&mut con, &stack.names.incoming, &wps, None, &token).await?;
    let n = wps.len();
    load::wait_for(&log, args.timeout, |l| l.seen.len() >= n).await;
    token.cancel();
    let name = variant.map_or(if ceiling { "ceiling" } else { "route" }, |v| v.name);
    let mut run = Run { workload: name.into(), work_packages: n, ..Default::default() };
    if let Some(p) = procs.as_mut() {
        run.peak_rss_mb = rss_mb(p);
        p.stop_all(Duration::from_secs(10)).await;
    }
    for w in workers {
        if let Ok(Err(e)) = w.await {
            anyhow::bail!("the ceiling loop failed: {e:#}");
        }
    }
    for a in agents {
        let _ = a.await;
    }
    let l = log.lock().unwrap_or_else(|p| p.into_inner());
    (run.finished, run.seconds, run.wp_per_s) = throughput(&l.seen, first);
    run.ingest_to_trigger = Some(l.ingest_to_trigger());
    run.duplicates = l.duplicates();
    run.lost = n - run.finished;
    Ok(run)
}

/// Plans with lanes and dependencies, agents that complete at once; paced or as fast as it goes.
async fn dag(args: &BenchArgs, stack: &Stack, client: &redis::Client, rate: Option<u32>) -> anyhow::Result<Run> {
    stack.reset(client).await?;
    let mut procs = stack.replicas(args, client, "bench-dag").await?;
    let token = CancellationToken::new();
    let log = Arc::new(Mutex::new(AgentLog::default()));
    let agents = load::agents(client, &AGENTS, true, &log, &token);
    let wps = load::plans(args.dag_plans, "d");
    let mut con = streams::blocking(client).await?;
    // Paced a plan per pipeline, so that a step is stored before its prerequisite completes.
    let pace = rate.map(|rate| load::Pace { rate, per_send: 10 });
    let (_, first) = load::produce(&mut con, &stack.names.incoming, &wps, pace, &token).await?;
    let n = wps.len();
    load::wait_for(&log, args.timeout, |l| l.completed.len() >= n).await;
    token.cancel();
    let mut run = Run { workload: if rate.is_some() { "dag-paced" } else { "dag" }.into(), work_packages: n, ..Default::default() };
    run.peak_rss_mb = rss_mb(&procs);
    procs.stop_all(Duration::from_secs(10)).await;
    for a in agents {
        let _ = a.await;
    }
    let l = log.lock().unwrap_or_else(|p| p.into_inner());
    (run.finished, run.seconds, run.wp_per_s) = throughput(&l.completed, first);
    run.completion_to_dispatch = Some(load::completion_to_dispatch(&wps, &l));
    run.duplicates = l.duplicates();
    run.lost = n - run.finished;
    Ok(run)
}

/// Which of `ids` in `stream` name which work package.
async fn wp_ids_of(con: &mut redis::aio::MultiplexedConnection, stream: &str, ids: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for id in ids {
        for e in streams::range(con, stream, id, id).await? {
            if let Some((_, wp)) = e.fields.unwrap_or_default().into_iter().find(|(k, _)| k == b"wp_id") {
                out.push(String::from_utf8_lossy(&wp).into_owned());
            }
        }
    }
    Ok(out)
}

/// Ids of the entries of `stream` pending at `consumer` of the replicas' group.
async fn pending_of(
    con: &mut redis::aio::MultiplexedConnection,
    names: &Names,
    stream: &str,
    consumer: &str,
) -> anyhow::Result<Vec<String>> {
    let pending = streams::delivery_counts(con, stream, &names.group, "-", "+", 100_000, consumer).await?;
    Ok(pending.into_iter().map(|(id, _)| id).collect())
}

/// kill -9 one of the replicas under steady load; time until what it held was processed.
async fn takeover(args: &BenchArgs, stack: &Stack, client: &redis::Client) -> anyhow::Result<Run> {
    stack.reset(client).await?;
    let mut procs = stack.replicas(args, client, "bench-takeover").await?;
    let token = CancellationToken::new();
    let log = Arc::new(Mutex::new(AgentLog::default()));
    let agents = load::agents(client, &AGENTS, true, &log, &token);
    let n = (args.takeover_load.as_secs_f64() * f64::from(args.rate)) as usize;
    let wps = load::independent(n, "t");
    let producer = {
        let (client, token, rate, incoming) = (client.clone(), token.clone(), args.rate, stack.names.incoming.clone());
        tokio::spawn(async move {
            let mut con = streams::blocking(&client).await?;
            load::produce(&mut con, &incoming, &wps, Some(load::Pace::steady(rate)), &token).await.map_err(anyhow::Error::from)
        })
    };
    tokio::time::sleep(args.takeover_load / 3).await;
    let mut con = client.get_multiplexed_async_connection().await?;
    let victim = procs.name(0).to_string();
    let mut rss = rss_mb(&procs);
    // Send the kill first: any read that lands between the pending snapshot and the kill
    // would otherwise be missed.
    procs.kill(0).await;
    let (killed, killed_us) = (std::time::Instant::now(), now_us());
    let names = &stack.names;
    let pending_in = pending_of(&mut con, names, &names.incoming, &victim).await?;
    let pending_done = pending_of(&mut con, names, &names.completed, &victim).await?;
    let left = tokio::spawn(procs::left_group(streams::Endpoint::direct(client.clone()), victim.clone(), killed));
    let (_, first) = producer.await.context("the takeover producer panicked")??;
    let pool = store::connect(&stack.database_url, 1).await?;
    wait_completed(&log, &pool, n, args.timeout).await?;
    // A short load is done before the killed replica's lease lapses (its TTL and a sweep):
    // the survivors must still be running to take it over.
    let left_by = tokio::time::Instant::from_std(killed) + args.timeout;
    let left_group_after_s = tokio::time::timeout_at(left_by, left).await.ok().and_then(|j| j.ok()).flatten().map(|d| d.as_secs_f64());
    token.cancel();
    rss.extend(rss_mb(&procs).into_iter().skip(1));
    procs.stop_all(Duration::from_secs(10)).await;
    for a in agents {
        let _ = a.await;
    }
    let held_in = wp_ids_of(&mut con, &names.incoming, &pending_in).await?;
    let held_done = wp_ids_of(&mut con, &names.completed, &pending_done).await?;
    // When the survivor acted on each held entry: the dispatch of an ingested work package,
    // the completion of a reported one. Times from PostgreSQL's clock, the same machine's.
    let processed: Option<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM max(t)) * 1e6)::float8 FROM (
             SELECT dispatched_at AS t FROM work_packages WHERE wp_id = ANY($1)
             UNION ALL SELECT completed_at FROM work_packages WHERE wp_id = ANY($2)) x",
    )
    .bind(&held_in)
    .bind(&held_done)
    .fetch_one(&pool)
    .await?;
    let completed: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE status = 'completed'").fetch_one(&pool).await?;
    pool.close().await;

    let l = log.lock().unwrap_or_else(|p| p.into_inner());
    let (finished, seconds, wp_per_s) = throughput(&l.completed, first);
    let held = held_in.len() + held_done.len();
    Ok(Run {
        workload: "takeover".into(),
        work_packages: n,
        finished,
        seconds,
        wp_per_s,
        duplicates: l.duplicates(),
        lost: n.saturating_sub(completed.max(0) as usize),
        peak_rss_mb: rss,
        takeover: Some(Takeover {
            pending_at_kill: held,
            processed_after_s: processed.filter(|_| held > 0).map(|t| (t - killed_us as f64).max(0.0) / 1e6),
            left_group_after_s,
        }),
        ..Default::default()
    })
}

/// Chains of 10 written to the incoming stream before any replica starts: how fast the replicas
/// drain a backlog in which every step waits for the one before it. Timed from the start of the
/// first replica to the last completion PostgreSQL records.
async fn chains(args: &BenchArgs, stack: &Stack, client: &redis::Client) -> anyhow::Result<Run> {
    stack.reset(client).await?;
    let token = CancellationToken::new();
    let log = Arc::new(Mutex::new(AgentLog::default()));
    let agents = load::agents(client, &AGENTS, true, &log, &token);
    let wps = load::chains(args.chains, "c");
    let n = wps.len();
    let mut con = streams::blocking(client).await?;
    load::produce(&mut con, &stack.names.incoming, &wps, None, &token).await?;
    let pool = store::connect(&stack.database_url, 1).await?;
    let first = now_us();
    let mut procs = stack.replicas(args, client, "bench-chains").await?;
    let finished = wait_completed(&log, &pool, n, args.timeout).await?;
    token.cancel();
    let peak_rss_mb = rss_mb(&procs);
    procs.stop_all(Duration::from_secs(10)).await;
    for a in agents {
        let _ = a.await;
    }
    let last: Option<f64> =
        sqlx::query_scalar("SELECT (extract(epoch FROM max(completed_at)) * 1e6)::float8 FROM work_packages").fetch_one(&pool).await?;
    pool.close().await;
    let seconds = last.map_or(0.0, |t| (t - first as f64).max(0.0) / 1e6);
    let l = log.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Run {
        workload: "chains".into(),
        work_packages: n,
        finished,
        seconds,
        wp_per_s: finished as f64 / seconds.max(1e-6),
        duplicates: l.duplicates(),
        lost: n - finished.min(n),
        peak_rss_mb,
        ..Default::default()
    })
}

pub async fn run(args: BenchArgs, token: CancellationToken) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.replicas >= 1, "--replicas must be at least 1");
    anyhow::ensure!(
        args.replicas >= 2 || !args.workloads.iter().any(|w| w == "takeover"),
        "the takeover workload kills a replica and needs a survivor: give --replicas 2 or more, or leave takeover out of --workloads"
    );
    let stack = Stack::start(&args).await?;
    let client = streams::client(&stack.redis_url)?;
    // Migrations once, before any replica starts.
    store::connect(&stack.database_url, 1).await?.close().await;
    println!(
        "bench: {} replicas, batch {}; Redis {}, PostgreSQL {}; logs in {}",
        args.replicas,
        args.batch_size,
        if stack.redis.is_some() { "local" } else { "given" },
        if stack.postgres.is_some() { "local" } else { "given" },
        stack.dir.display()
    );
    let mut runs = Vec::new();
    for w in &args.workloads {
        if token.is_cancelled() {
            break;
        }
        let done = match w.as_str() {
            "route" => vec![route(&args, &stack, &client, false, None).await?],
            "ceiling" => vec![route(&args, &stack, &client, true, None).await?],
            "dag" => vec![dag(&args, &stack, &client, None).await?],
            "dag-paced" => vec![dag(&args, &stack, &client, Some(args.rate)).await?],
            "takeover" => vec![takeover(&args, &stack, &client).await?],
            "chains" => vec![chains(&args, &stack, &client).await?],
            "capped" => vec![controls::capped_run(&args, &stack, &client, false).await?],
            "capped-controls" => vec![controls::capped_run(&args, &stack, &client, true).await?],
            "fair-wait" => vec![controls::fair_wait(&args, &stack, &client).await?],
            "held-backlog" => vec![held::held_backlog(&args, &stack, &client).await?],
            "peer" => peer::peer(&args, &stack, &client).await?,
            "traces" => traces::traces(&args, &stack, &client).await?,
            other => anyhow::bail!(
                "unknown workload {other:?} (route, ceiling, dag, dag-paced, takeover, chains, capped, capped-controls, fair-wait, \
                 held-backlog, peer, traces)"
            ),
        };
        for run in done {
            println!("  {}", report::line(&run));
            runs.push(run);
        }
    }
    let report = report::Report::new(args.replicas, args.batch_size, runs);
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.sound() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
