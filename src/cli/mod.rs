//! The command line: one binary for the replica, the operators' commands, the reference agent
//! and the tools. Each command group is a file here that declares its arguments and runs them;
//! this file only parses, sets up logging and hands over.

mod approvals;
mod args;
mod budget;
mod cluster;
mod controls;
mod deadletter;
mod door;
mod routing;
mod schedule;
mod submit;
mod work;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::engine::settings::RunSettings;
use crate::replica;
use crate::tools::{agent, bench, chaos, dev, soak};

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
    CheckConfig(routing::CheckConfig),
    /// Show where an entry with these fields would go, and why, without touching Redis.
    Route(routing::Route),
    /// Send a plan's work packages to the incoming stream.
    Submit(submit::Submit),
    /// Run a reference agent: `agent NAME -- CMD ARGS...`.
    Agent(agent::AgentArgs),
    /// Counts per status, work packages and why each waits, dead-letter count.
    Status(work::Status),
    /// Retry a failed or cancelled work package.
    Retry(work::Retry),
    /// Cancel a work package (running work included: its agent is told to stop) or a plan's
    /// open work, and every work package that depends on them.
    Cancel(work::Cancel),
    /// Mark a work package completed without running it, so its dependents and lane go on.
    Skip(work::Skip),
    /// Approve a work package waiting for approval: it completes, its dependents go on.
    Approve(approvals::Decide),
    /// Reject a work package waiting for approval: it fails.
    Reject(approvals::Decide),
    /// Send an event: it completes the work packages waiting for its key (or is kept for them).
    Event(approvals::EventCmd),
    /// Run a completed, failed or cancelled work package again (with --downstream, what
    /// depends on it too), as a new attempt.
    Rerun(work::Rerun),
    /// Pause an agent, a lane or a plan: its work waits until it is resumed.
    Pause(controls::PauseCmd),
    /// Resume a paused agent, lane or plan.
    Resume(controls::ResumeCmd),
    /// List what is paused.
    Pauses(controls::PausesCmd),
    /// Schedules (v1.6): add, remove, pause, resume, list.
    Schedule {
        #[command(subcommand)]
        action: schedule::Action,
    },
    /// (v1.6) Set or remove a plan's budget; show spend and budgets.
    Budget {
        #[command(subcommand)]
        action: budget::Action,
    },
    /// List or requeue dead letters.
    Deadletter {
        #[command(subcommand)]
        action: deadletter::Action,
    },
    /// Agents of the routing file with their in-flight count and capacity.
    Agents(cluster::Agents),
    /// Replicas from their `system.health` heartbeats.
    Replicas(cluster::Replicas),
    /// Ask every replica to re-read the routing file.
    Reload(cluster::Reload),
    /// Inject faults into replicas under load and check that nothing is lost or doubled.
    Chaos(chaos::ChaosArgs),
    /// Measure throughput, latency, takeover and memory of real replicas beside the Redis
    /// ceiling.
    Bench(bench::BenchArgs),
    /// A long run with fast retention: Redis memory, database size and replica RSS sampled
    /// until they plateau (SOAK.md).
    Soak(soak::SoakArgs),
    /// Run the local stack: Redis and PostgreSQL (unless given), two replicas, demo agents and
    /// a sample plan, showing the work as it moves.
    Dev(dev::DevArgs),
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    // rustls needs one crypto provider chosen per process; an Err means one is set already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(settings) => {
            init_logging(&cli.log_format, "info");
            replica::run(*settings, shutdown_token()?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig(c) => Ok(c.run()),
        Command::Route(c) => c.run(),
        Command::Submit(c) => c.run().await,
        Command::Agent(args) => {
            init_logging(&cli.log_format, "info");
            agent::run(args, shutdown_token()?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(c) => c.run().await,
        Command::Retry(c) => c.run().await,
        Command::Cancel(c) => c.run().await,
        Command::Skip(c) => c.run().await,
        Command::Approve(c) => c.approve().await,
        Command::Reject(c) => c.reject().await,
        Command::Event(c) => c.run().await,
        Command::Rerun(c) => c.run().await,
        Command::Pause(c) => c.run().await,
        Command::Resume(c) => c.run().await,
        Command::Pauses(c) => c.run().await,
        Command::Schedule { action } => action.run().await,
        Command::Budget { action } => action.run().await,
        Command::Deadletter { action } => action.run().await,
        Command::Agents(c) => c.run().await,
        Command::Replicas(c) => c.run().await,
        Command::Reload(c) => c.run().await,
        Command::Chaos(args) => {
            init_logging(&cli.log_format, "error");
            chaos::run(args, shutdown_token()?).await
        }
        Command::Bench(args) => {
            init_logging(&cli.log_format, "error");
            bench::run(args, shutdown_token()?).await
        }
        Command::Soak(args) => {
            init_logging(&cli.log_format, "error");
            soak::run(args, shutdown_token()?).await
        }
        Command::Dev(args) => {
            init_logging(&cli.log_format, "warn");
            dev::run(args, shutdown_token()?).await
        }
    }
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
