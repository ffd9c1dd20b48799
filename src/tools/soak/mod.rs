//! `ge-orchestrator soak`: a long run with fast retention, to show that Redis memory, the
//! database and the replicas' memory stop growing while the work goes on. Its own Redis and
//! PostgreSQL, replicas as processes, a paced mix of independent work, chains and lanes (the
//! benchmark's workloads), agents that complete everything and check order and duplicates;
//! every few seconds a sample of Redis `used_memory`, the database size and each replica's
//! RSS. Writes the table and the plot of SOAK.md, and with `--json` every figure.

mod agent;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::settings::Names;
use crate::engine::{store, streams};
use crate::tools::bench::load::{self, Wp};
use crate::tools::localstack::{LocalPostgres, LocalRedis, PostgresOptions, RedisOptions};
use crate::tools::procs::ReplicaProcs;

use agent::Seen;
use report::{Plateau, Sample};

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Work packages to send, in blocks of 30: 10 independent, a chain of 10 and a plan of 10
    /// with three lanes and a fan-in.
    #[arg(long, default_value_t = 1_000_000)]
    pub work_packages: usize,
    /// Work packages sent per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// The replicas' GE_RETENTION (and dispatch-key lifetime).
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// The replicas' GE_RETENTION_INTERVAL.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub retention_interval: Duration,
    /// Time between samples.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub sample: Duration,
    /// After the load, how long to wait for everything to be completed and then removed.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// The plot (SVG).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// The table and the verdicts, in Markdown.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const AGENTS: [&str; 4] = ["s1", "s2", "s3", "s4"];
const ROUTING: &str = "version: 1
agents:
  s1: { roles: [worker] }
  s2: { roles: [worker] }
  s3: { roles: [worker] }
  s4: { roles: [worker] }
work_types:
  build: worker
default_agent: s1
";
/// A plateau holds within this share of its mean; throughput within this of its start.
const PLATEAU_PCT: f64 = 10.0;
const THROUGHPUT_PCT: f64 = 20.0;

/// What the run shows: the invariants, the plateaus and the state once the work drained.
#[derive(Debug, Serialize)]
pub(crate) struct SoakReport {
    pub work_packages: usize,
    /// Sent to the incoming stream (all of them, unless the run was stopped).
    pub sent: usize,
    pub rate: u32,
    pub retention_s: f64,
    pub load_s: f64,
    pub completed: usize,
    pub lost: usize,
    pub duplicates: u64,
    pub out_of_order: Vec<String>,
    pub deadletters: u64,
    pub plateaus: Vec<Plateau>,
    pub throughput_start: f64,
    pub throughput_end: f64,
    pub throughput_held: bool,
    /// After the drain: rows and entries left, which retention must have brought to (about)
    /// nothing.
    pub final_work_package_rows: i64,
    pub final_event_rows: i64,
    pub final_edge_rows: i64,
    pub final_stream_lengths: Vec<(String, u64)>,
    /// Work still open after the drain (at most 10): why each waits, for whoever reads a
    /// failed run.
    pub open_left: Vec<String>,
    pub samples: Vec<Sample>,
}

/// The work of block `b`: 10 independent, a chain of 10, a plan of 10.
fn block(b: usize) -> Vec<Wp> {
    let mut out = load::independent(10, &format!("i{b}."));
    out.extend(load::chains(1, &format!("c{b}.")));
    out.extend(load::plans(1, &format!("p{b}.")));
    for wp in &mut out {
        if !wp.prereqs.is_empty() {
            wp.fields.push(("soak_after", wp.prereqs.join(",")));
        }
    }
    out
}

/// VmRSS of a process, in MB.
fn rss_mb(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0.0 };
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

struct Probe {
    con: streams::MasterConnection,
    pool: sqlx::PgPool,
    names: Names,
}

impl Probe {
    async fn streams(&mut self) -> anyhow::Result<Vec<(String, u64)>> {
        let n = &self.names;
        let mut out = Vec::new();
        for s in [&n.incoming, &n.completed, &n.failed, &n.heartbeat].into_iter().cloned().chain(AGENTS.iter().map(|a| n.trigger_stream(a)))
        {
            let len = streams::len(&mut self.con, &s).await?;
            out.push((s, len));
        }
        Ok(out)
    }

    async fn sample(
        &mut self,
        t0: Instant,
        seen: &Arc<Mutex<Seen>>,
        procs: &ReplicaProcs,
        last: Option<&Sample>,
    ) -> anyhow::Result<Sample> {
        let completed = seen.lock().unwrap_or_else(|p| p.into_inner()).completed.len() as u64;
        let t_s = t0.elapsed().as_secs_f64();
        let wp_per_s = match last {
            Some(l) if t_s > l.t_s => (completed.saturating_sub(l.completed)) as f64 / (t_s - l.t_s),
            _ => 0.0,
        };
        let redis_mb = streams::used_memory(&mut self.con).await? as f64 / 1_048_576.0;
        let db: i64 = crate::ops::reads::database_bytes(&self.pool).await?;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM work_packages").fetch_one(&self.pool).await?;
        let stream_entries = self.streams().await?.iter().map(|(_, n)| n).sum();
        let incoming_lag = streams::group_lag(&mut self.con, &self.names.incoming, &self.names.group).await?.unwrap_or(0).max(0) as u64;
        Ok(Sample {
            t_s,
            completed,
            wp_per_s,
            redis_mb,
            db_mb: db as f64 / 1_048_576.0,
            rss_mb: (0..procs.len()).map(|s| rss_mb(procs.pid(s))).collect(),
            work_package_rows: rows,
            stream_entries,
            incoming_lag,
        })
    }
}

pub async fn run(args: SoakArgs, token: CancellationToken) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("ge-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("routing.yaml");
    std::fs::write(&config, ROUTING)?;
    let redis = LocalRedis::start(RedisOptions::default()).await?;
    let postgres = LocalPostgres::start(PostgresOptions::default()).await?;
    let database_url = postgres.create_database("soak").await?;
    let pool = store::connect(&database_url, 2).await?;
    let client = streams::client(&redis.url())?;
    let names = Names::default();

    let retention = format!("{}ms", args.retention.as_millis());
    let env = vec![
        ("REDIS_URL".into(), redis.url()),
        ("DATABASE_URL".into(), database_url.clone()),
        ("GE_ROUTING_CONFIG".into(), config.to_string_lossy().into_owned()),
        ("GE_RETENTION".into(), retention.clone()),
        // No faults here: nothing stalls, so a retention of seconds is safe.
        ("GE_RETENTION_FLOOR".into(), "0s".into()),
        ("GE_RETENTION_INTERVAL".into(), format!("{}ms", args.retention_interval.as_millis())),
        ("GE_HEALTH_INTERVAL".into(), "5s".into()),
        // Shorter than the retention, which bounds the dispatch keys' lifetime.
        ("GE_REPUBLISH_AFTER".into(), format!("{}ms", args.retention.min(Duration::from_secs(10)).as_millis() / 2)),
    ];
    let mut procs = ReplicaProcs::new(env, &["--block", "1s", "--http-addr", "off", "--log-format", "json"], dir.clone(), "soak")?;
    for slot in 0..args.replicas {
        procs.spawn(slot)?;
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let agents_token = CancellationToken::new();
    let agents: Vec<_> =
        AGENTS.iter().map(|a| tokio::spawn(agent::agent(client.clone(), a.to_string(), seen.clone(), agents_token.clone()))).collect();

    let mut probe = Probe { con: streams::connect(&redis.url()).await?, pool: pool.clone(), names: names.clone() };
    let producer_token = token.child_token();
    // No response timeout: under load a pipeline may take longer than the default 500 ms, and
    // a timed-out pipeline cannot be sent again (its entries would differ in their send time).
    let mut producer_con = streams::blocking(&client).await.context("connecting the producer")?;
    let blocks = args.work_packages.div_ceil(30);
    let total = blocks * 30;
    let rate = args.rate;
    let incoming = names.incoming.clone();
    let pt = producer_token.clone();
    let stop = token.clone();
    let producer = tokio::spawn(async move {
        // A second's worth at a time, paced by `produce` in 10 ms slices.
        let per_call = (rate as usize / 30).max(1);
        let mut b = 0;
        while b < blocks && !pt.is_cancelled() {
            let wps: Vec<Wp> = (b..(b + per_call).min(blocks)).flat_map(block).collect();
            if let Err(e) = load::produce(&mut producer_con, &incoming, &wps, Some(load::Pace::steady(rate)), &pt).await {
                eprintln!("soak: the producer stopped after {} work packages: {e}", b * 30);
                // The run cannot reach its total: stop it, and report what it saw.
                stop.cancel();
                return b * 30;
            }
            b += per_call;
        }
        b.min(blocks) * 30
    });

    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut tick = tokio::time::interval(args.sample);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut load_end = None;
    let mut drain_deadline = None;
    let mut drained = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => break,
        }
        let s = probe.sample(t0, &seen, &procs, samples.last()).await?;
        let done = s.completed as usize >= total;
        eprintln!(
            "soak t={:.0}s completed={} wp/s={:.0} redis={:.1}MB db={:.1}MB rss={:?} rows={} entries={} lag={}",
            s.t_s, s.completed, s.wp_per_s, s.redis_mb, s.db_mb, s.rss_mb, s.work_package_rows, s.stream_entries, s.incoming_lag
        );
        let rows = s.work_package_rows;
        samples.push(s);
        if load_end.is_none() && producer.is_finished() {
            if done {
                load_end = Some(samples.len());
            }
            // Everything is sent: the completions and then the removals get this long.
            drain_deadline.get_or_insert(Instant::now() + args.drain_timeout);
        }
        if load_end.is_some() && rows == 0 {
            drained = true;
            break;
        }
        if drain_deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
    }
    producer_token.cancel();
    let sent = producer.await.unwrap_or(0);
    let final_streams = probe.streams().await?;
    let (final_wps, final_events, final_edges): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM work_packages), (SELECT count(*) FROM work_package_events), (SELECT count(*) FROM work_package_deps)",
    )
    .fetch_one(&pool)
    .await?;
    let open_left: Vec<String> = sqlx::query_scalar(
        "SELECT wp_id || ' ' || status || ' (unmet prerequisites ' || unmet_deps || '): ' || coalesce(wait_reason, '-')
         FROM work_packages WHERE status NOT IN ('completed', 'cancelled') ORDER BY source_ms, source_seq LIMIT 10",
    )
    .fetch_all(&pool)
    .await?;
    let deadletters = streams::len(&mut probe.con, &names.deadletter).await?;
    agents_token.cancel();
    for a in agents {
        let _ = a.await;
    }
    procs.stop_all(Duration::from_secs(10)).await;

    let load_len = load_end.unwrap_or(samples.len()).max(1);
    // The first sample has no throughput of its own.
    let load = &samples[1.min(samples.len())..load_len.min(samples.len())];
    let series = |f: &dyn Fn(&Sample) -> f64| load.iter().map(f).collect::<Vec<f64>>();
    let mut plateaus = vec![
        report::plateau("redis_used_memory", &series(&|s| s.redis_mb), PLATEAU_PCT),
        report::plateau("database_size", &series(&|s| s.db_mb), PLATEAU_PCT),
    ];
    for r in 0..args.replicas {
        plateaus.push(report::plateau(&format!("replica_{r}_rss"), &series(&|s| s.rss_mb.get(r).copied().unwrap_or(0.0)), PLATEAU_PCT));
    }
    let (start, end) = report::throughput_thirds(load);
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let load_s = samples.get(load_len.saturating_sub(1)).map(|s| s.t_s).unwrap_or(0.0);
    let out = SoakReport {
        work_packages: total,
        sent,
        rate: args.rate,
        retention_s: args.retention.as_secs_f64(),
        load_s,
        completed: seen.completed.len(),
        lost: total.saturating_sub(seen.completed.len()),
        duplicates: seen.duplicates,
        out_of_order: seen.out_of_order.iter().take(20).cloned().collect(),
        deadletters,
        plateaus,
        throughput_start: start,
        throughput_end: end,
        throughput_held: start > 0.0 && (end - start).abs() / start * 100.0 <= THROUGHPUT_PCT,
        final_work_package_rows: final_wps,
        final_event_rows: final_events,
        final_edge_rows: final_edges,
        final_stream_lengths: final_streams,
        open_left,
        samples,
    };
    let md = markdown(&out);
    print!("{md}");
    if let Some(p) = &args.markdown {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.svg {
        std::fs::write(p, report::svg(&out.samples, load_s)).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&out)?).with_context(|| format!("writing {}", p.display()))?;
    }
    drop(redis);
    drop(postgres);
    let _ = std::fs::remove_dir_all(&dir);
    let ok = out.sent == total && out.lost == 0 && out.duplicates == 0 && out.out_of_order.is_empty() && drained;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn markdown(r: &SoakReport) -> String {
    let mut out = format!(
        "{} work packages at {} WP/s through {} replicas, retention {} s: {} completed, {} lost, {} duplicate dispatches, \
         {} out of order, {} dead letters; load {:.0} s.\n\n",
        r.work_packages,
        r.rate,
        r.samples.first().map(|s| s.rss_mb.len()).unwrap_or(0),
        r.retention_s,
        r.completed,
        r.lost,
        r.duplicates,
        r.out_of_order.len(),
        r.deadletters,
        r.load_s
    );
    out.push_str("| series (last third of the load) | mean | largest deviation | within ±10 % |\n|---|---:|---:|---|\n");
    for p in &r.plateaus {
        out.push_str(&format!("| {} | {:.1} | {:.1} % | {} |\n", p.series, p.mean, p.max_deviation_pct, if p.held { "yes" } else { "no" }));
    }
    out.push_str(&format!(
        "| throughput, WP/s (first third → last third) | {:.0} → {:.0} | {:.1} % | {} (±20 %) |\n\n",
        r.throughput_start,
        r.throughput_end,
        if r.throughput_start > 0.0 { (r.throughput_end - r.throughput_start).abs() / r.throughput_start * 100.0 } else { 0.0 },
        if r.throughput_held { "yes" } else { "no" }
    ));
    out.push_str(&format!(
        "After the drain: {} work-package rows, {} history rows, {} edges; stream lengths {}.\n\n",
        r.final_work_package_rows,
        r.final_event_rows,
        r.final_edge_rows,
        r.final_stream_lengths.iter().map(|(s, n)| format!("{s}={n}")).collect::<Vec<_>>().join(", ")
    ));
    if !r.open_left.is_empty() {
        out.push_str(&format!("Still open after the drain (the first 10): {}.\n\n", r.open_left.join("; ")));
    }
    out.push_str(&report::table(&r.samples, 24));
    out
}
