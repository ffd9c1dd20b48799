//! `status`, `retry`, `cancel` and `skip`: what the work is doing, and the operators' actions
//! on one work package.

use std::process::ExitCode;

use super::args::{DatabaseArg, redis_con};
use crate::core::status::STATUSES;
use crate::engine::settings::Names;
use crate::engine::{store, streams};
use crate::ops::{actions, reads, status};

#[derive(clap::Args)]
pub(crate) struct Status {
    wp_id: Option<String>,
    #[command(flatten)]
    db: DatabaseArg,
    /// Also count dead letters.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// The most recent this many work packages that match the filters.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    limit: i64,
    /// Only work packages with this status.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(STATUSES))]
    status: Option<String>,
    /// Only work packages of this lane.
    #[arg(long)]
    lane: Option<String>,
    /// Only work packages of this agent (of their current or last dispatch).
    #[arg(long)]
    agent: Option<String>,
    /// Only work packages of this plan: the wp_ids whose part before their last dot is PLAN
    /// (`--plan run1` for a plan submitted with `--prefix run1.`).
    #[arg(long)]
    plan: Option<String>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    names: Names,
    /// (v1.6) The routing file, for the agents' budgets in the spend shown.
    #[arg(long = "config", env = "GE_ROUTING_CONFIG")]
    config: Option<std::path::PathBuf>,
}

impl Status {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let pool = self.db.connect().await?;
        let spend = self.spend(&pool).await?;
        let (deadletters, retention) = match &self.redis_url {
            Some(url) => {
                let mut con = redis_con(url).await?;
                let n = streams::len(&mut con, &self.names.deadletter).await?;
                (Some(n), retention_in_force(&mut con, &self.names.health).await?)
            }
            None => (None, None),
        };
        // The counts are those of the filters too, without the limit.
        let filter = reads::Filter {
            wp_id: self.wp_id,
            status: self.status,
            lane: self.lane,
            agent: self.agent,
            prefix: None,
            plan: self.plan,
            limit: Some(self.limit),
        };
        let overview = status::Overview {
            counts: reads::counts_matching(&pool, &reads::Filter { limit: None, ..filter.clone() }).await?,
            work_packages: reads::list(&pool, &filter).await?,
            deadletters,
            retention,
            schedules: crate::engine::schedule_store::list(&pool).await?,
            spend: Some(spend),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&overview)?);
        } else {
            print!("{}", status::render(&overview));
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl Status {
    /// Spend and budgets (v1.6); the agents' budgets when the routing file can be read.
    async fn spend(&self, pool: &sqlx::PgPool) -> anyhow::Result<crate::engine::budgets::Overview> {
        let routing = self.config.as_deref().and_then(|p| crate::core::routing_file::load(p).ok());
        Ok(crate::engine::budgets::overview(pool, routing.as_ref(), 0.8, 20).await?)
    }
}

/// The retention the replicas run with, from the newest health entry of a live one (an
/// operator's command does not know the replicas' settings).
async fn retention_in_force(con: &mut streams::MasterConnection, health: &str) -> anyhow::Result<Option<(String, String)>> {
    let reps = actions::replicas(con, health, std::time::Duration::from_secs(120), 200).await?;
    Ok(reps
        .into_iter()
        .filter(|r| r.live)
        .find_map(|r| Some((r.heartbeat.get("retention")?.clone(), r.heartbeat.get("trigger_retention")?.clone()))))
}

#[derive(clap::Args)]
pub(crate) struct Retry {
    wp_id: String,
    #[command(flatten)]
    db: DatabaseArg,
}

impl Retry {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let wp_id = &self.wp_id;
        if store::retry(&self.db.connect().await?, wp_id).await? {
            println!("{wp_id} will be dispatched again");
            Ok(ExitCode::SUCCESS)
        } else {
            eprintln!("{wp_id} is not failed or cancelled (or does not exist); nothing to retry");
            Ok(ExitCode::FAILURE)
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct Cancel {
    wp_id: String,
    #[command(flatten)]
    db: DatabaseArg,
}

impl Cancel {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let wp_id = &self.wp_id;
        let cancelled = store::cancel(&self.db.connect().await?, wp_id).await?;
        if cancelled.is_empty() {
            eprintln!("{wp_id} is already completed or cancelled (or does not exist); nothing to cancel");
            return Ok(ExitCode::FAILURE);
        }
        println!("cancelled {}", cancelled.join(", "));
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub(crate) struct Skip {
    wp_id: String,
    #[command(flatten)]
    db: DatabaseArg,
}

impl Skip {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let wp_id = &self.wp_id;
        match store::skip(&self.db.connect().await?, wp_id).await? {
            Some(_) => {
                println!("{wp_id} marked completed (skipped); what waited on it goes on");
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("{wp_id} is already completed (or does not exist); nothing to skip");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
