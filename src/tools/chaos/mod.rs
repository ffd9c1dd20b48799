//! `ge-orchestrator chaos`: N replica processes and fake agents under load, with faults
//! injected at random moments — kill -9 of a replica (then a restart), SIGSTOP past its lease
//! and SIGCONT, a Redis restart (AOF, fsync always), a PostgreSQL restart; with `--topology ha`,
//! failovers of a Redis watched by Sentinels and of a PostgreSQL with a synchronous standby —
//! and, at the end, the invariants of `chaos_check`. Bounded in time; prints a table,
//! optionally JSON.

mod aof;
mod check;
mod links;
mod operator;
mod waits;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::engine::settings::Names;
use crate::engine::store;
use crate::engine::streams::{self, Endpoint, MasterConnection, Reader};
use crate::tools::localstack::{LocalPostgres, LocalRedis, PostgresOptions, RedisOptions};
use crate::tools::procs::{self, ReplicaProcs};
use crate::tools::topology::{self, PostgresHa, RedisHa};
use check::{AgentLog, Observed, Submitted};
use links::Links;

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// How long faults are injected; at least until each kind was injected once.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Work packages submitted per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Mean time between faults.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub fault_interval: Duration,
    /// Fault kinds to inject: kill, stop, redis, postgres (the default) with the single
    /// topology; redis-failover, postgres-failover (the default), kill, stop with `ha`. The
    /// network faults, single topology only (each replica then reaches Redis and PostgreSQL
    /// through proxies of its own): redis-cut (1 s), redis-partition (Redis cut 5 s, PostgreSQL
    /// kept), postgres-cut (5 s), slow (200 ms each way, 5 s), reset (connections reset in the
    /// middle of a reply). `all`: the four of the default and the five network faults.
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// The Redis's `appendfsync` (single topology): `always`, or `everysec` to see what a
    /// kill -9 of Redis loses with the common production setting.
    #[arg(long, default_value = "always", value_parser = ["always", "everysec"])]
    pub appendfsync: String,
    /// At each Redis kill -9, also drop what the AOF received in the last second (truncate it
    /// to its size a second before), as a crash of the machine would with `everysec`; a kill
    /// of the process alone loses nothing Redis acknowledged.
    #[arg(long)]
    pub lose_unsynced: bool,
    /// `single`: one Redis, one PostgreSQL, restarted in place. `ha`: a Redis master and
    /// replica with three Sentinels, a PostgreSQL primary and synchronous standby behind a
    /// proxy; producers wait for a Redis replica (WAIT) after each XADD.
    #[arg(long, default_value = "single", value_parser = ["single", "ha"])]
    pub topology: String,
    /// One bad entry (dead-lettered on purpose) per this many work packages.
    #[arg(long, default_value_t = 50)]
    pub bad_every: u32,
    /// Longest wait for the work to finish after the faults stop.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// (v1.6) An operator's cancel of a recent work package (waiting, running or done) this
    /// often on average; `off` for none.
    #[arg(long, default_value = "2s", value_parser = duration_or_off)]
    pub cancel_every: Duration,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The replicas' GE_RETENTION (with GE_RETENTION_INTERVAL 1s), so finished work is removed
    /// and streams trimmed while the faults go on. A work package no longer in PostgreSQL
    /// counts as completed when an agent reported one of its dispatches completed (retention
    /// removes only finished work, and the agents fail nothing); duplicates are counted over
    /// the triggers the agents received as well as those still in the streams.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
}

/// Short sweep intervals, so the backstop also gets exercised within a run.
const REPLICA_ARGS: [&str; 14] = [
    "--block",
    "1s",
    "--http-addr",
    "off",
    "--scheduler-interval",
    "200ms",
    "--recover-interval",
    "5s",
    "--claim-min-idle",
    "5s",
    "--republish-after",
    "2s",
    "--log-format",
    "json",
];
const AGENTS: [&str; 3] = ["w1", "w2", "w3"];
const ROUTING: &str = "version: 1
agents:
  w1: { roles: [worker] }
  w2: { roles: [worker] }
  w3: { roles: [worker] }
work_types:
  build: worker
default_agent: w1
retry: { max_attempts: 5, backoff: { initial: 200ms, factor: 2, max: 2s } }
";

/// A fake agent: runs every trigger at once, completes it, and logs each run and each report
/// in the client history. Each run's outcome (its `result`) is drawn at random, so that a
/// dispatch run twice would most likely be reported with two outcomes; an entry delivered
/// again (its own pending entries after a Redis restart) is reported as it was run.
async fn fake_agent(endpoint: Endpoint, agent: &'static str, log: Arc<Mutex<AgentLog>>, token: CancellationToken) {
    let names = Names::default();
    let stream = names.trigger_stream(agent);
    let group = format!("agent-{agent}");
    let Ok(mut manager) = MasterConnection::connect(&endpoint).await else { return };
    let _ = streams::ensure_group(&mut manager, &stream, &group).await;
    // A Redis restart can lose the reply of a read it has already made pending, and a failover
    // the report and acknowledgement the old master had not replicated.
    let mut reader = Reader::new(endpoint, &stream, &group, "chaos", 64, Duration::from_millis(500)).own_first_after_reconnect();
    let mut outcomes: HashMap<String, &'static str> = HashMap::new();
    while let Some(entries) = reader.next(&token).await {
        for e in entries {
            let (Some(wp), Some(dispatch)) = (e.field("wp_id"), e.field("dispatch_id")) else { continue };
            let outcome = match outcomes.get(&e.id) {
                Some(o) => {
                    log.lock().unwrap_or_else(|p| p.into_inner()).redelivered += 1;
                    *o
                }
                None => {
                    // Some results carry a NUL byte, which PostgreSQL cannot store: the report
                    // must still complete its work package.
                    let o = if rand::random_ratio(1, 10) { "done\0with a NUL" } else { "done" };
                    outcomes.insert(e.id.clone(), o);
                    log.lock().unwrap_or_else(|p| p.into_inner()).run(&dispatch, &wp, &e.id);
                    o
                }
            };
            loop {
                // Stamped before sending: the orchestrator may act on the completion (and the
                // next trigger reach another agent) before this call returns.
                let sending = Instant::now();
                let report = [("wp_id", wp.as_str()), ("dispatch_id", &dispatch), ("agent_id", agent), ("result", outcome)];
                if streams::report_and_ack(&mut manager, &names.completed, &[report], &stream, &group, &[&e.id]).await.is_ok() {
                    log.lock().unwrap_or_else(|p| p.into_inner()).report(sending, &dispatch, &wp, outcome);
                    break;
                }
                if token.is_cancelled() {
                    return;
                }
                reader.backoff.wait(&token).await;
            }
        }
        reader.backoff.reset();
    }
}

/// XADD to the incoming stream with retries, as a producer does while Redis restarts. With
/// `confirm`, the entry is sent again until a replica has it (WAIT): what a producer must do
/// for its entry to survive a failover, which can lose what the old master acknowledged.
async fn xadd(con: &mut MasterConnection, incoming: &str, fields: &[(String, String)], confirm: bool) {
    while !sent(con, incoming, fields, confirm).await {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One try of `xadd`: whether the entry went in (and, with `confirm`, a replica has it).
pub(super) async fn sent(con: &mut MasterConnection, stream: &str, fields: &[(String, String)], confirm: bool) -> bool {
    streams::xadd(con, stream, None, fields).await.is_ok()
        && (!confirm || streams::wait_for_replicas(con, 1, Duration::from_secs(1)).await.is_ok_and(|n| n >= 1))
}

/// Plans of 10: five in a lane (lanes shared between plans), four fanned out from the first,
/// one fan-in. Plus, now and then, an entry that must be dead-lettered.
async fn load(endpoint: Endpoint, args: ChaosArgs, submitted: Arc<Mutex<Submitted>>, token: CancellationToken) {
    let names = Names::default();
    let confirm = args.topology == "ha";
    let mut con = loop {
        match MasterConnection::connect(&endpoint).await {
            Ok(c) => break c,
            Err(_) if !token.is_cancelled() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_) => return,
        }
    };
    let per_wp = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut n = 0u64;
    let mut count = 0u32;
    while !token.is_cancelled() {
        let plan = format!("p{n}");
        let lane = format!("lane-{}", n % 7);
        for i in 0..10 {
            let wp = format!("{plan}.{i}");
            let mut fields = vec![("wp_id".to_string(), wp.clone()), ("work_type".to_string(), "build".to_string())];
            let mut deps = Vec::new();
            match i {
                0..=4 => fields.push(("lane".into(), lane.clone())),
                5..=8 => deps.push(format!("{plan}.0")),
                _ => deps.extend((5..=8).map(|d| format!("{plan}.{d}"))),
            }
            if !deps.is_empty() {
                fields.push(("depends_on".into(), deps.join(",")));
            }
            xadd(&mut con, &names.incoming, &fields, confirm).await;
            {
                let mut s = submitted.lock().unwrap_or_else(|p| p.into_inner());
                s.wp_ids.push(wp.clone());
                if i <= 4 {
                    s.lanes.entry(lane.clone()).or_default().push(wp.clone());
                }
                s.deps.extend(deps.into_iter().map(|d| (wp.clone(), d)));
            }
            count += 1;
            if count.is_multiple_of(args.bad_every.max(1)) {
                let bad = format!("bad-{count}");
                // Kinds of bad input in turn: an agent name no routing file has, a NUL byte
                // PostgreSQL cannot store, a field over the size limit. Each is dead-lettered.
                let kind = (count / args.bad_every.max(1)) % 3;
                let extra: (String, String) = match kind {
                    0 => ("agent_id".into(), "../nobody".into()),
                    1 => ("payload".into(), "binary\0data".into()),
                    _ => ("note".into(), "n".repeat(65 << 10)),
                };
                xadd(&mut con, &names.incoming, &[("wp_id".into(), bad.clone()), extra], confirm).await;
                submitted.lock().unwrap_or_else(|p| p.into_inner()).bad.insert(bad);
            }
            tokio::time::sleep(per_wp).await;
        }
        n += 1;
    }
}

/// What the replicas stand on.
enum Stack {
    /// One Redis (AOF, fsync always) and one PostgreSQL, killed and restarted in place.
    Single { redis: LocalRedis, postgres: LocalPostgres },
    /// Redis with Sentinels, PostgreSQL with a synchronous standby behind a proxy.
    Ha { redis: RedisHa, postgres: PostgresHa },
}

impl Stack {
    async fn start(topology: &str) -> anyhow::Result<Stack> {
        Ok(match topology {
            "ha" => Stack::Ha { redis: RedisHa::start().await?, postgres: PostgresHa::start().await? },
            _ => Stack::Single {
                redis: LocalRedis::start(RedisOptions { persistent: true, ..Default::default() }).await?,
                postgres: LocalPostgres::start(PostgresOptions::default()).await?,
            },
        })
    }

    fn redis_url(&self) -> String {
        match self {
            Stack::Single { redis, .. } => redis.url(),
            Stack::Ha { redis, .. } => redis.url(),
        }
    }

    async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        match self {
            Stack::Single { postgres, .. } => postgres.create_database(name).await,
            Stack::Ha { postgres, .. } => postgres.create_database(name).await,
        }
    }
}

/// From a fault until a work package submitted right after it has completed: a probe (agent
/// w1, no lane, no dependency) sent plainly, with retries, and looked for in PostgreSQL.
async fn resumed(endpoint: Endpoint, pool: sqlx::PgPool, wp: String, fault: Instant, confirm: bool) -> Option<Duration> {
    let fields = [("wp_id".to_string(), wp.clone()), ("agent_id".to_string(), "w1".to_string())];
    let deadline = fault + Duration::from_secs(120);
    loop {
        if let Ok(mut con) = MasterConnection::connect(&endpoint).await
            && sent(&mut con, &Names::default().incoming, &fields, confirm).await
        {
            break;
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while Instant::now() < deadline {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM work_packages WHERE wp_id = $1").bind(&wp).fetch_optional(&pool).await.ok().flatten();
        if status.as_deref() == Some("completed") {
            return Some(fault.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// p50 and max of `times` (sorted), as text.
fn p50_max(times: &[Duration]) -> (String, String) {
    let p = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q).round() as usize)
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into())
    };
    (p(0.5), p(1.0))
}

async fn joined(handles: Vec<tokio::task::JoinHandle<Option<Duration>>>) -> (Vec<Duration>, usize) {
    let mut times = Vec::new();
    let mut unmeasured = 0;
    for h in handles {
        match h.await {
            Ok(Some(d)) => times.push(d),
            _ => unmeasured += 1,
        }
    }
    times.sort();
    (times, unmeasured)
}

pub async fn run(mut args: ChaosArgs, token: CancellationToken) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    if args.faults.is_empty() {
        let kinds: &[&str] =
            if args.topology == "ha" { &["redis-failover", "postgres-failover"] } else { &["kill", "stop", "redis", "postgres"] };
        args.faults = kinds.iter().map(|k| k.to_string()).collect();
    }
    if args.faults.iter().any(|f| f == "all") {
        args.faults = ["kill", "stop", "redis", "postgres"].into_iter().chain(links::KINDS).map(str::to_string).collect();
    }
    let network = args.faults.iter().any(|f| links::KINDS.contains(&f.as_str()));
    if (network || args.appendfsync != "always" || args.lose_unsynced) && args.topology != "single" {
        anyhow::bail!("network faults and --appendfsync go with --topology single only");
    }
    let mut stack = Stack::start(&args.topology).await?;
    let database_url = stack.create_database("chaos").await?;
    let dir = tempfile_dir()?;
    let config = dir.join("routing.yaml");
    std::fs::write(&config, ROUTING)?;
    let pool = store::connect(&database_url, 2).await?;
    let endpoint = Endpoint::parse(&stack.redis_url())?;

    let mut env: Vec<(String, String)> = vec![
        ("REDIS_URL".into(), stack.redis_url()),
        ("DATABASE_URL".into(), database_url.clone()),
        ("GE_ROUTING_CONFIG".into(), config.to_string_lossy().into_owned()),
    ];
    if let Some(r) = args.retention {
        env.push(("GE_RETENTION".into(), format!("{}ms", r.as_millis())));
        env.push(("GE_RETENTION_INTERVAL".into(), "1s".into()));
    }
    // Republication must come before a dispatch key expires, and keys live no longer than the
    // retention (the replica refuses otherwise).
    let republish = match args.retention {
        Some(r) => format!("{}ms", (r.as_millis() / 2).clamp(1, 2000)),
        None => "2s".into(),
    };
    let mut replica_args: Vec<&str> = REPLICA_ARGS.to_vec();
    if let Some(i) = replica_args.iter().position(|a| *a == "--republish-after") {
        replica_args[i + 1] = republish.as_str();
    }
    let mut replicas = ReplicaProcs::new(env, &replica_args, dir.clone(), "chaos")?;
    let links = match network {
        true => Some(Links::start(&mut replicas, args.replicas, &stack.redis_url(), &database_url).await?),
        false => None,
    };
    set_appendfsync(&endpoint, &args.appendfsync).await?;
    let aof_sizes = aof::AofSizes::default();
    let aof_watch = CancellationToken::new();
    let _stop_watching = aof_watch.clone().drop_guard();
    if let (true, Stack::Single { redis, .. }) = (args.lose_unsynced, &stack) {
        aof_sizes.watch(redis.dir().to_path_buf(), aof_watch);
    }
    let mut aof_dropped: Vec<u64> = Vec::new();
    for slot in 0..args.replicas {
        replicas.spawn(slot)?;
    }
    println!(
        "chaos: {} replicas, {} WP/s for {:?}, a fault every ~{:?} ({}); logs in {}",
        args.replicas,
        args.rate,
        args.duration,
        args.fault_interval,
        args.faults.join(","),
        dir.display()
    );

    let work = CancellationToken::new();
    let log = Arc::new(Mutex::new(AgentLog::default()));
    let submitted = Arc::new(Mutex::new(Submitted::default()));
    let mut tasks = Vec::new();
    for agent in AGENTS {
        tasks.push(tokio::spawn(fake_agent(endpoint.clone(), agent, log.clone(), work.clone())));
    }
    let load_token = CancellationToken::new();
    let loader = tokio::spawn(load(endpoint.clone(), args.clone(), submitted.clone(), load_token.clone()));
    // (v1.6) Approvals and events among the load, decided while the faults go on.
    let waiting = Arc::new(Mutex::new(waits::Waits::default()));
    let wait_loader =
        tokio::spawn(waits::load(endpoint.clone(), submitted.clone(), waiting.clone(), args.topology == "ha", load_token.clone()));
    tasks.push(tokio::spawn(waits::decide(endpoint.clone(), database_url.clone(), work.clone())));
    let canceller = (!args.cancel_every.is_zero()).then_some(args.cancel_every).map(|every| {
        tokio::spawn(operator::cancel_now_and_then(pool.clone(), endpoint.clone(), submitted.clone(), every, load_token.clone()))
    });

    let mut faults: HashMap<&'static str, u32> = HashMap::new();
    let mut takeovers = Vec::new();
    let mut resumes: HashMap<&'static str, Vec<tokio::task::JoinHandle<Option<Duration>>>> = HashMap::new();
    let mut promotions = Vec::new();
    let mut handovers: HashMap<&'static str, Vec<tokio::task::JoinHandle<Option<Duration>>>> = HashMap::new();
    let probe = |kind: &'static str, fault: Instant, resumes: &mut HashMap<_, Vec<_>>| {
        let wp = format!("probe-{}", submitted.lock().unwrap_or_else(|p| p.into_inner()).wp_ids.len());
        submitted.lock().unwrap_or_else(|p| p.into_inner()).wp_ids.push(wp.clone());
        resumes.entry(kind).or_default().push(tokio::spawn(resumed(endpoint.clone(), pool.clone(), wp, fault, args.topology == "ha")));
    };
    let mut rng = rand::rng();
    // Kinds take turns, from a random start, so even a short run injects every kind; the
    // replica and the moment are random.
    let mut turn = rng.random_range(0..args.faults.len().max(1));
    // On a slow machine one fault and its recovery can take most of a short run; it goes on
    // until every kind had its turn, so that a short run still proves each.
    let mut injected = 0;
    while (started.elapsed() < args.duration || injected < args.faults.len()) && !token.is_cancelled() {
        injected += 1;
        let wait = args.fault_interval.mul_f64(rng.random_range(0.5..1.5));
        tokio::time::sleep(wait).await;
        let kind = args.faults[turn % args.faults.len()].clone();
        turn += 1;
        let slot = rng.random_range(0..args.replicas);
        // When each fault began, beside the replicas' logs: what a person reads them against.
        let line = format!("{} {kind} (replica slot {slot})\n", chrono::Utc::now().format("%H:%M:%S%.3f"));
        let _ = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("faults.log")).and_then(|mut f| {
            use std::io::Write;
            f.write_all(line.as_bytes())
        });
        match kind.as_str() {
            "kill" => {
                let name = replicas.kill(slot).await;
                takeovers.push(tokio::spawn(procs::left_group(endpoint.clone(), name, Instant::now())));
                tokio::time::sleep(Duration::from_millis(500)).await;
                replicas.spawn(slot)?;
                *faults.entry("kill -9 + restart").or_default() += 1;
            }
            "stop" => {
                replicas.signal(slot, libc::SIGSTOP);
                tokio::time::sleep(Duration::from_secs(3)).await;
                replicas.signal(slot, libc::SIGCONT);
                *faults.entry("SIGSTOP 3s + SIGCONT").or_default() += 1;
            }
            "redis" | "postgres" | "redis-failover" | "postgres-failover" => match (&mut stack, kind.as_str()) {
                (Stack::Single { redis, .. }, "redis") => {
                    redis.kill();
                    if args.lose_unsynced {
                        aof_dropped.push(aof_sizes.lose_unsynced(redis.dir())?);
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    redis.restart().await?;
                    set_appendfsync(&endpoint, &args.appendfsync).await?;
                    *faults.entry("Redis kill -9 + restart").or_default() += 1;
                }
                (Stack::Single { postgres, .. }, "postgres") => {
                    postgres.kill();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    postgres.restart().await?;
                    *faults.entry("PostgreSQL kill -9 + restart").or_default() += 1;
                }
                (Stack::Ha { redis, .. }, "redis-failover") => {
                    let fault = Instant::now();
                    let old = redis.kill_master().await?;
                    probe("Redis failover", fault, &mut resumes);
                    redis.wait_promoted(old, Duration::from_secs(60)).await?;
                    promotions.push(fault.elapsed());
                    // Back as the new master's replica, so that the next failover has one.
                    redis.restart(old).await?;
                    *faults.entry("Redis master kill -9, Sentinel failover").or_default() += 1;
                }
                (Stack::Ha { postgres, .. }, "postgres-failover") => {
                    let fault = Instant::now();
                    postgres.fail_over().await?;
                    probe("PostgreSQL failover", fault, &mut resumes);
                    postgres.add_standby().await?;
                    *faults.entry("PostgreSQL primary kill -9, standby promoted").or_default() += 1;
                }
                (_, other) => anyhow::bail!("fault kind {other:?} does not go with --topology {}", args.topology),
            },
            net if links::KINDS.contains(&net) => {
                let Some(links) = links.as_ref() else { anyhow::bail!("no proxies for {net}") };
                let net: &'static str = links::KINDS.iter().copied().find(|k| *k == net).unwrap_or("network");
                let (name, at) = (replicas.name(slot).to_string(), Instant::now());
                if matches!(net, "postgres-cut" | "redis-partition") {
                    handovers.entry(net).or_default().push(tokio::spawn(procs::left_group(endpoint.clone(), name, at)));
                }
                *faults.entry(links.inject(net, slot).await?).or_default() += 1;
            }
            other => anyhow::bail!(
                "unknown fault kind {other:?} (kill, stop, redis, postgres, redis-failover, postgres-failover, {}, all)",
                links::KINDS.join(", ")
            ),
        }
    }
    load_token.cancel();
    let _ = loader.await;
    let _ = wait_loader.await;
    let cancels = match canceller {
        Some(c) => c.await.unwrap_or_default(),
        None => operator::Cancels::default(),
    };

    // Let the work drain.
    let total = submitted.lock().unwrap_or_else(|p| p.into_inner()).wp_ids.len() as i64;
    let settle_start = Instant::now();
    loop {
        // Cancelled work (v1.6) is as finished as completed work; waits are counted apart.
        let mut done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM work_packages WHERE status IN ('completed', 'cancelled') AND wp_id NOT LIKE 'bad-%' AND wait_for IS NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
        if args.retention.is_some() {
            // Completed work is removed as it goes: done once nothing is open and the agents
            // completed every work package.
            let open: i64 =
                sqlx::query_scalar("SELECT count(*) FROM work_packages WHERE status NOT IN ('completed', 'failed', 'cancelled')")
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(1);
            let completed = log.lock().unwrap_or_else(|p| p.into_inner()).completed_wps().len();
            done = if open == 0 { completed as i64 } else { 0 };
        }
        if done >= total || settle_start.elapsed() > args.settle || token.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A moment more for stragglers (duplicates, late dead letters) to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drained = settle_start.elapsed();
    work.cancel();
    for t in tasks {
        let _ = t.await;
    }
    replicas.stop_all(Duration::from_secs(15)).await;

    let received = log.lock().unwrap_or_else(|p| p.into_inner()).trigger_entries();
    let mut observed = observe(&pool, &endpoint, &received).await?;
    {
        let roots = submitted.lock().unwrap_or_else(|p| p.into_inner()).cancel_roots.clone();
        let reached = operator::cancelled(&pool, &roots).await?;
        operator::explain_untraced(&pool, &reached).await?;
        submitted.lock().unwrap_or_else(|p| p.into_inner()).cancelled = reached;
    }
    let (invariants, submitted_count, bad_count, redelivered) = {
        let sub = submitted.lock().unwrap_or_else(|p| p.into_inner());
        let log = log.lock().unwrap_or_else(|p| p.into_inner());
        let removed = check::count_removed(&sub, &log, &mut observed);
        if args.retention.is_some() {
            println!("  removed by retention (completed, per the agents): {removed}");
        }
        let mut invariants = check::check_history(&sub, &log);
        invariants.extend(check::check(&sub, &log, &observed));
        invariants.extend(waits::check(&waiting.lock().unwrap_or_else(|p| p.into_inner()), &observed));
        (invariants, sub.wp_ids.len(), sub.bad.len(), log.redelivered)
    };
    let (times, unmeasured) = joined(takeovers).await;
    let mut resume_times = Vec::new();
    for (kind, handles) in resumes {
        let (t, missed) = joined(handles).await;
        resume_times.push((kind, t, missed));
    }
    resume_times.sort_by_key(|(k, _, _)| *k);
    promotions.sort();

    println!("\nfaults injected ({} in {:.0} s):", faults.values().sum::<u32>(), args.duration.as_secs_f64());
    let mut kinds: Vec<_> = faults.iter().collect();
    kinds.sort();
    for (k, n) in kinds {
        println!("  {k:<32} {n}");
    }
    println!(
        "\ninvariants ({submitted_count} work packages, {bad_count} bad inputs, drained {:.1} s after the faults stopped):",
        drained.as_secs_f64()
    );
    for by in ["agents", "orchestrator"] {
        println!("  by {}:", if by == "agents" { "the agents' history" } else { "the orchestrator's tables and streams" });
        for i in invariants.iter().filter(|i| i.by == by) {
            println!("    {:<50} {:<6}  {}", i.name, if i.held { "held" } else { "BROKEN" }, i.detail);
        }
    }
    let (p50, max) = p50_max(&times);
    println!("\ntakeover after kill -9 (until the dead consumer's entries are taken over and it left the group):");
    println!(
        "  kills {}  p50 {p50}  max {max}{}",
        times.len(),
        if unmeasured > 0 { format!("  ({unmeasured} not measured)") } else { String::new() }
    );
    if !handovers.is_empty() {
        println!("\nhandover after a cut (from the cut until survivors took over its entries and removed it from the group):");
        let mut kinds: Vec<_> = handovers.into_iter().collect();
        kinds.sort_by_key(|(k, _)| *k);
        for (kind, handles) in kinds {
            let (t, missed) = joined(handles).await;
            let (p50, max) = p50_max(&t);
            let missed = if missed > 0 { format!("  ({missed} not measured)") } else { String::new() };
            println!("  {kind:<22} {}  p50 {p50}  max {max}{missed}", t.len());
        }
    }
    if !resume_times.is_empty() {
        println!("\ntime to resume (from the kill -9 until a work package submitted then has completed):");
        for (kind, t, missed) in &resume_times {
            let (p50, max) = p50_max(t);
            println!(
                "  {kind:<22} {}  p50 {p50}  max {max}{}",
                t.len(),
                if *missed > 0 { format!("  ({missed} NOT RESUMED)") } else { String::new() }
            );
        }
    }
    if !promotions.is_empty() {
        let (p50, max) = p50_max(&promotions);
        println!(
            "  Sentinel promotion     {}  p50 {p50}  max {max} (from the kill until every Sentinel names the new master)",
            promotions.len()
        );
    }
    if let Stack::Ha { redis, .. } = &stack {
        // The Sentinels' and nodes' logs go where the replicas' are: the HA stack's own
        // directory goes with it.
        for e in std::fs::read_dir(redis.dir()).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), dir.join(e.file_name()));
            }
        }
        println!(
            "\nsettings: Redis {}; Sentinel {}; PostgreSQL {}",
            settings_text(&topology::REDIS_SETTINGS),
            settings_text(&topology::SENTINEL_SETTINGS),
            settings_text(&topology::POSTGRES_SETTINGS)
        );
    }
    println!("  agent redeliveries after Redis restarts: {redelivered}");
    println!(
        "  operator cancels (v1.6): {} tried, {} work packages cancelled, {} of them while dispatched",
        cancels.tried, cancels.cancelled, cancels.running
    );
    if args.appendfsync != "always" {
        println!("  Redis appendfsync: {}", args.appendfsync);
    }
    if args.lose_unsynced {
        aof_dropped.sort();
        println!(
            "  AOF bytes dropped at the Redis kills (its last second): {} kills, total {}, p50 {}, max {}",
            aof_dropped.len(),
            aof_dropped.iter().sum::<u64>(),
            aof_dropped.get(aof_dropped.len().saturating_sub(1) / 2).copied().unwrap_or(0),
            aof_dropped.last().copied().unwrap_or(0)
        );
    }

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "duration_s": args.duration.as_secs_f64(),
            "replicas": args.replicas,
            "work_packages": submitted_count,
            "bad_inputs": bad_count,
            "faults": faults,
            "invariants": invariants,
            "takeover_s": { "count": times.len(), "p50": times.get(times.len() / 2).map(Duration::as_secs_f64), "max": times.last().map(Duration::as_secs_f64) },
            "topology": args.topology,
            "appendfsync": args.appendfsync,
            "aof_bytes_dropped": aof_dropped,
            "resume_s": resume_times.iter().map(|(k, t, missed)| (k.to_string(), serde_json::json!({
                "count": t.len(), "not_resumed": missed,
                "p50": t.get(t.len().saturating_sub(1) / 2).map(Duration::as_secs_f64), "max": t.last().map(Duration::as_secs_f64),
            }))).collect::<serde_json::Map<_, _>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let ok = invariants.iter().all(|i| i.held) && resume_times.iter().all(|(_, _, missed)| *missed == 0);
    println!("\n{}", if ok { "chaos: all invariants held" } else { "chaos: INVARIANTS BROKEN" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `CONFIG SET appendfsync` on the Redis of the single topology (after each restart too, which
/// starts it with `always`).
async fn set_appendfsync(endpoint: &Endpoint, mode: &str) -> anyhow::Result<()> {
    if mode == "always" {
        return Ok(());
    }
    let mut con = MasterConnection::connect(endpoint).await?;
    let _: () = redis::cmd("CONFIG").arg("SET").arg("appendfsync").arg(mode).query_async(&mut con).await?;
    Ok(())
}

fn settings_text(settings: &[(&str, &str)]) -> String {
    settings.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

/// What PostgreSQL and Redis hold at the end; the triggers counted per dispatch_id over those
/// still in the streams and those the agents received (`seen`, entry ids), since retention
/// trims what the agents acknowledged.
async fn observe(pool: &sqlx::PgPool, endpoint: &Endpoint, seen: &HashMap<String, HashSet<String>>) -> anyhow::Result<Observed> {
    use sqlx::Row;
    let states = sqlx::query("SELECT wp_id, status, attempts FROM work_packages")
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("wp_id")?, (r.try_get("status")?, r.try_get("attempts")?))))
        .collect::<Result<HashMap<String, (String, i32)>, sqlx::Error>>()?;
    let mut first_dispatched = HashMap::new();
    let mut first_completed = HashMap::new();
    let events = sqlx::query(
        "SELECT wp_id, status, (extract(epoch FROM min(at)) * 1000000)::int8 AS at FROM work_package_events
          WHERE status IN ('dispatched', 'completed') GROUP BY wp_id, status",
    )
    .fetch_all(pool)
    .await?;
    for r in events {
        let (wp, status, at): (String, String, i64) = (r.try_get("wp_id")?, r.try_get("status")?, r.try_get("at")?);
        match status.as_str() {
            "dispatched" => first_dispatched.insert(wp, at),
            _ => first_completed.insert(wp, at),
        };
    }
    let names = Names::default();
    let mut con = MasterConnection::connect(endpoint).await?;
    let mut entries: HashMap<String, HashSet<String>> = seen.clone();
    let mut in_streams: HashMap<String, HashSet<String>> = HashMap::new();
    for agent in AGENTS {
        for e in streams::range(&mut con, &names.trigger_stream(agent), "-", "+").await? {
            let d = e
                .fields
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| k == b"dispatch_id")
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
            in_streams.entry(d.clone().unwrap_or_default()).or_default().insert(e.id.clone());
            entries.entry(d.unwrap_or_default()).or_default().insert(e.id);
        }
    }
    // Where each duplicate was seen: both in the final streams, or one only by an agent (read
    // from a master that lost it in a failover).
    for (d, ids) in entries.iter().filter(|(_, ids)| ids.len() > 1) {
        let kept = in_streams.get(d).cloned().unwrap_or_default();
        let read = seen.get(d).cloned().unwrap_or_default();
        println!("  duplicate {d}: entries {ids:?}; in the final streams {kept:?}; read by the agents {read:?}");
    }
    let trigger_counts: HashMap<String, usize> = entries.into_iter().map(|(d, ids)| (d, ids.len())).collect();
    let deadletters = streams::range(&mut con, &names.deadletter, "-", "+")
        .await?
        .into_iter()
        .map(|e| {
            let f: HashSet<(String, String)> = e
                .fields
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
                .collect();
            let get = |name: &str| f.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
            (get("reason"), get("wp_id"))
        })
        .collect();
    Ok(Observed { states, trigger_counts, deadletters, first_dispatched, first_completed })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ge-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A duration, or `off` (zero).
fn duration_or_off(s: &str) -> Result<Duration, humantime::DurationError> {
    if s == "off" { Ok(Duration::ZERO) } else { humantime::parse_duration(s) }
}
