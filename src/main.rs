//! The command line: one binary for the replica, the operators' commands, the reference agent
//! and the local stack.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use ge_orchestrator::settings::{Names, RunSettings};
use ge_orchestrator::{agent, bench, chaos, config, dev, plan, redact, replica, router, status, store, streams};

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
        Command::Submit { plan: path, redis_url, prefix, names } => {
            let plan = plan::Plan::load(&path)?.with_prefix(&prefix);
            let client = streams::client(&redis_url)?;
            let mut con = streams::manager(&client).await.with_context(|| format!("connecting to {}", redact::url(&redis_url)))?;
            let ids = plan::submit(&mut con, &names.incoming, &plan).await.context("submitting the plan")?;
            println!("submitted {} work packages to {} ({} .. {})", ids.len(), names.incoming, ids.first().map(String::as_str).unwrap_or("-"), ids.last().map(String::as_str).unwrap_or("-"));
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
