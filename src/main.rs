//! The command line: one binary for the replica, the operators' commands, the reference agent
//! and the local stack.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use ge_orchestrator::settings::{Names, RunSettings};
use ge_orchestrator::{agent, bench, chaos, config, dev, ops, plan, progress, redact, replica, router, status, store, streams};

#[derive(Parser)]
#[command(name = "ge-orchestrator", version, about = "Routes work packages to AI agents and enforces their order")]
struct Cli {
    /// Log format of long-running commands: json or text.
    #[arg(long, global = true, env = "GE_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one replica.
    Run(Box<RunSettings>),
    /// Validate a routing file and print the resolved routing table.
    CheckConfig { file: PathBuf },
    /// Show where an entry with these fields would go, and why, without touching Redis.
    Route {
        #[arg(long = "config", env = "GE_ROUTING_CONFIG", default_value = "config/dolly-routing.yaml")]
        config: PathBuf,
        /// Print the reasoning, not only the agent.
        #[arg(long)]
        explain: bool,
        /// Work in flight per agent, as agent=N, to see caps at work.
        #[arg(long = "in-flight", value_parser = parse_kv)]
        in_flight: Vec<(String, String)>,
        /// Entry fields as field=value (agent_id, work_type, trigger).
        #[arg(value_parser = parse_kv)]
        fields: Vec<(String, String)>,
    },
    /// Send a plan's work packages to the incoming stream.
    Submit {
        plan: PathBuf,
        #[arg(long, env = "REDIS_URL")]
        redis_url: String,
        /// Prefix for every wp_id (and dependency) of the plan, to submit it again as new work.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Show a progress bar until every work package of the plan is completed, failed or
        /// cancelled (needs DATABASE_URL); exits 1 if any failed or was cancelled.
        #[arg(long)]
        wait: bool,
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[command(flatten)]
        names: Names,
    },
    /// Run a reference agent: `agent NAME -- CMD ARGS...`.
    Agent(agent::AgentArgs),
    /// Counts per status, work packages and why each waits, dead-letter count.
    Status {
        wp_id: Option<String>,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Also count dead letters.
        #[arg(long, env = "REDIS_URL")]
        redis_url: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: i64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        names: Names,
    },
    /// Retry a failed or cancelled work package.
    Retry {
        wp_id: String,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Cancel a work package and every work package that depends on it.
    Cancel {
        wp_id: String,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Mark a work package completed without running it, so its dependents and lane go on.
    Skip {
        wp_id: String,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// List or requeue dead letters.
    Deadletter {
        #[command(subcommand)]
        action: DeadletterAction,
    },
    /// Agents of the routing file with their in-flight count and capacity.
    Agents {
        #[arg(long = "config", env = "GE_ROUTING_CONFIG", default_value = "config/dolly-routing.yaml")]
        config: PathBuf,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long)]
        json: bool,
    },
    /// Replicas from their `system.health` heartbeats.
    Replicas {
        #[arg(long, env = "REDIS_URL")]
        redis_url: String,
        /// A replica whose last heartbeat is older than this is not live.
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        stale_after: std::time::Duration,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        names: Names,
    },
    /// Ask every replica to re-read the routing file.
    Reload {
        #[arg(long, env = "REDIS_URL")]
        redis_url: String,
        #[command(flatten)]
        names: Names,
    },
    /// Inject faults into replicas under load and check that nothing is lost or doubled.
    Chaos(chaos::ChaosArgs),
    /// Measure throughput, latency, takeover and memory of real replicas beside the Redis
    /// ceiling.
    Bench(bench::BenchArgs),
    /// Run the local stack: Redis and PostgreSQL (unless given), two replicas, demo agents and
    /// a sample plan, showing the work as it moves.
    Dev(dev::DevArgs),
}

#[derive(Subcommand)]
enum DeadletterAction {
    /// Dead letters, newest first.
    List {
        #[arg(long, env = "REDIS_URL")]
        redis_url: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only this reason code (unknown_agent, unroutable, ...).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        names: Names,
    },
    /// Send dead letters back to the stream they came from (after fixing the routing).
    Requeue {
        /// The dead-letter entry id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter (of --reason, if given), oldest first.
        #[arg(long)]
        all: bool,
        #[arg(long, requires = "all")]
        reason: Option<String>,
        #[arg(long, env = "REDIS_URL")]
        redis_url: String,
        #[command(flatten)]
        names: Names,
    },
}

async fn redis_con(url: &str) -> anyhow::Result<redis::aio::ConnectionManager> {
    let client = streams::client(url)?;
    streams::manager(&client).await.with_context(|| format!("connecting to {}", redact::url(url)))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("expected field=value, got {s:?}"))
}

fn init_logging(format: &str, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// A token cancelled by the first SIGTERM or SIGINT.
fn shutdown_token() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    Ok(token)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // rustls needs one crypto provider chosen per process; an Err means one is set already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match real_main(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match cli.command {
        Command::Run(settings) => {
            init_logging(&cli.log_format, "info");
            replica::run(*settings, shutdown_token()?).await?;
        }
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(table) => print!("{}", table.describe()),
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        Command::Route { config: path, explain, in_flight, fields } => {
            let table = config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty());
            let loads: Vec<(String, u32)> = in_flight
                .iter()
                .map(|(a, n)| n.parse().map(|n| (a.clone(), n)).with_context(|| format!("--in-flight {a}={n}: not a number")))
                .collect::<anyhow::Result<_>>()?;
            let load = |a: &str| loads.iter().find(|(x, _)| x == a).map(|(_, n)| *n).unwrap_or(0);
            let req = router::RouteRequest { agent_id: get("agent_id"), work_type: get("work_type"), trigger: get("trigger") };
            match router::route(&req, &table, &load) {
                router::Decision::Dispatch { agent, kind, reason } => {
                    if explain {
                        println!("dispatch to {agent} (route {})\n  because {reason}", kind.as_str());
                    } else {
                        println!("{agent}");
                    }
                }
                router::Decision::Wait { kind, candidates, reason } => {
                    println!("wait as ready (route {}; candidates {})\n  because {reason}", kind.as_str(), candidates.join(", "));
                }
                router::Decision::DeadLetter { reason, detail } => {
                    println!("dead-letter as {}\n  because {detail}", reason.as_str());
                    return Ok(ExitCode::from(2));
                }
            }
        }
        Command::Submit { plan: path, redis_url, prefix, wait, database_url, names } => {
            let plan = plan::Plan::load(&path)?.with_prefix(&prefix);
            // Connect before submitting, so --wait without a database fails before any work is sent.
            let pool = match (wait, database_url) {
                (true, Some(url)) => Some(store::connect(&url, 2).await?),
                (true, None) => anyhow::bail!("submit --wait needs --database-url or DATABASE_URL to follow the plan"),
                (false, _) => None,
            };
            let mut con = redis_con(&redis_url).await?;
            let ids = plan::submit(&mut con, &names.incoming, &plan).await.context("submitting the plan")?;
            println!("submitted {} work packages to {} ({} .. {})", ids.len(), names.incoming, ids.first().map(String::as_str).unwrap_or("-"), ids.last().map(String::as_str).unwrap_or("-"));
            if let Some(pool) = pool {
                return progress::wait_for_plan(&pool, &plan.wp_ids(), shutdown_token()?).await;
            }
        }
        Command::Agent(args) => {
            init_logging(&cli.log_format, "info");
            agent::run(args, shutdown_token()?).await?;
        }
        Command::Status { wp_id, database_url, redis_url, limit, json, names } => {
            let pool = store::connect(&database_url, 2).await?;
            let deadletters = match redis_url {
                Some(url) => {
                    let client = streams::client(&url)?;
                    let mut con = streams::manager(&client).await.context("connecting to Redis")?;
                    Some(redis::cmd("XLEN").arg(&names.deadletter).query_async::<u64>(&mut con).await?)
                }
                None => None,
            };
            let overview = status::Overview {
                counts: status::counts(&pool).await?,
                work_packages: status::work_packages(&pool, wp_id.as_deref(), limit).await?,
                deadletters,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&overview)?);
            } else {
                print!("{}", status::render(&overview));
            }
        }
        Command::Retry { wp_id, database_url } => {
            let pool = store::connect(&database_url, 2).await?;
            if store::retry(&pool, &wp_id).await? {
                println!("{wp_id} will be dispatched again");
            } else {
                eprintln!("{wp_id} is not failed or cancelled (or does not exist); nothing to retry");
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Cancel { wp_id, database_url } => {
            let pool = store::connect(&database_url, 2).await?;
            let cancelled = store::cancel(&pool, &wp_id).await?;
            if cancelled.is_empty() {
                eprintln!("{wp_id} is already completed or cancelled (or does not exist); nothing to cancel");
                return Ok(ExitCode::FAILURE);
            }
            println!("cancelled {}", cancelled.join(", "));
        }
        Command::Skip { wp_id, database_url } => {
            let pool = store::connect(&database_url, 2).await?;
            match store::skip(&pool, &wp_id).await? {
                Some(_) => println!("{wp_id} marked completed (skipped); what waited on it goes on"),
                None => {
                    eprintln!("{wp_id} is already completed (or does not exist); nothing to skip");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Deadletter { action: DeadletterAction::List { redis_url, limit, reason, json, names } } => {
            let mut con = redis_con(&redis_url).await?;
            let dls = ops::deadletters(&mut con, &names.deadletter, limit, reason.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dls)?);
            } else if dls.is_empty() {
                println!("no dead letters");
            } else {
                for d in &dls {
                    let wp = d.fields.get("wp_id").map(String::as_str).unwrap_or("-");
                    println!("{}  {:<14} wp {:<24} from {}  {}", d.id, d.reason, wp, d.stream, d.detail);
                }
            }
        }
        Command::Deadletter { action: DeadletterAction::Requeue { id, all, reason, redis_url, names } } => {
            let mut con = redis_con(&redis_url).await?;
            let outcomes = match (id, all) {
                (Some(id), false) => vec![ops::requeue(&mut con, &names, &id).await?],
                _ => ops::requeue_all(&mut con, &names, reason.as_deref()).await?,
            };
            let mut failed = false;
            for o in &outcomes {
                match o {
                    ops::Requeue::Requeued { id, stream, new_id } => println!("{id} requeued to {stream} as {new_id}"),
                    ops::Requeue::NotFound { id } => {
                        eprintln!("{id}: no such dead letter (already requeued?)");
                        failed = true;
                    }
                    ops::Requeue::Empty { id } => eprintln!("{id}: has no original fields to send again; left in place"),
                }
            }
            if outcomes.is_empty() {
                println!("no dead letters to requeue");
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Agents { config: path, database_url, json } => {
            let table = config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let pool = store::connect(&database_url, 2).await?;
            let agents = ops::agents(&pool, &table).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&agents)?);
            } else {
                println!("{:<12}  {:<24}  {:<9}  IN FLIGHT", "AGENT", "ROLES", "ENABLED");
                for a in &agents {
                    let cap = a.max_in_flight.map(|c| c.to_string()).unwrap_or_else(|| "no cap".into());
                    println!("{:<12}  {:<24}  {:<9}  {} / {cap}", a.agent_id, a.roles.join(","), a.enabled, a.in_flight);
                }
            }
        }
        Command::Replicas { redis_url, stale_after, json, names } => {
            let mut con = redis_con(&redis_url).await?;
            let reps = ops::replicas(&mut con, &names.health, stale_after, 1000).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reps)?);
            } else if reps.is_empty() {
                println!("no heartbeats in {}", names.health);
            } else {
                for r in &reps {
                    let pending = r.heartbeat.get("pending").map(String::as_str).unwrap_or("?");
                    let live = if r.live { "live" } else { "gone" };
                    println!("{:<28} {live:<5} {:<9} {:>6.0} s ago  pending {pending}", r.instance, r.status, r.age_seconds);
                }
            }
        }
        Command::Reload { redis_url, names } => {
            let client = streams::client(&redis_url)?;
            let mut con = streams::manager(&client).await.context("connecting to Redis")?;
            let n: u64 = redis::cmd("PUBLISH").arg(&names.reload_channel).arg("reload").query_async(&mut con).await?;
            println!("reload signal sent to {n} replica(s)");
        }
        Command::Chaos(args) => {
            init_logging(&cli.log_format, "error");
            return chaos::run(args, shutdown_token()?).await;
        }
        Command::Bench(args) => {
            init_logging(&cli.log_format, "error");
            return bench::run(args, shutdown_token()?).await;
        }
        Command::Dev(args) => {
            init_logging(&cli.log_format, "warn");
            return dev::run(args, shutdown_token()?).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}
