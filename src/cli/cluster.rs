//! `agents`, `replicas` and `reload`: the fleet as the orchestrator sees it.

use std::process::ExitCode;
use std::time::Duration;

use super::args::{DatabaseArg, RedisArg, RoutingArg};
use crate::engine::settings::Names;
use crate::engine::streams;
use crate::ops::actions;

#[derive(clap::Args)]
pub(crate) struct Agents {
    #[command(flatten)]
    routing: RoutingArg,
    #[command(flatten)]
    db: DatabaseArg,
    #[arg(long)]
    json: bool,
}

impl Agents {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let table = self.routing.load()?;
        let agents = actions::agents(&self.db.connect().await?, &table).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&agents)?);
        } else {
            println!("{:<12}  {:<24}  {:<9}  IN FLIGHT", "AGENT", "ROLES", "ENABLED");
            for a in &agents {
                let cap = a.max_in_flight.map(|c| c.to_string()).unwrap_or_else(|| "no cap".into());
                println!("{:<12}  {:<24}  {:<9}  {} / {cap}", a.agent_id, a.roles.join(","), a.enabled, a.in_flight);
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub(crate) struct Replicas {
    #[command(flatten)]
    redis: RedisArg,
    /// A replica whose last heartbeat is older than this is not live.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    names: Names,
}

impl Replicas {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let reps = actions::replicas(&mut self.redis.connect().await?, &self.names.health, self.stale_after, 1000).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&reps)?);
        } else if reps.is_empty() {
            println!("no heartbeats in {}", self.names.health);
        } else {
            for r in &reps {
                let pending = r.heartbeat.get("pending").map(String::as_str).unwrap_or("?");
                let live = if r.live { "live" } else { "gone" };
                println!("{:<28} {live:<5} {:<9} {:>6.0} s ago  pending {pending}", r.instance, r.status, r.age_seconds);
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub(crate) struct Reload {
    #[command(flatten)]
    redis: RedisArg,
    #[command(flatten)]
    names: Names,
}

impl Reload {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let n = streams::request_reload(&mut self.redis.connect().await?, &self.names.reload_channel).await?;
        println!("reload signal sent to {n} replica(s)");
        Ok(ExitCode::SUCCESS)
    }
}
