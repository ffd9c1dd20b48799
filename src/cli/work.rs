//! `status`, `retry`, `cancel`, `skip` and `rerun`: what the work is doing, and the operators'
//! actions on work packages, each through the one door of `ops::operations`.

use std::process::ExitCode;

use super::args::{DatabaseArg, redis_con};
use super::door::{DoorArgs, outcome};
use crate::core::status::STATUSES;
use crate::engine::settings::Names;
use crate::engine::store::Roots;
use crate::engine::streams;
use crate::ops::{actions, operations, reads, status};

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
    door: DoorArgs,
}

impl Retry {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let opened = self.door.open().await?;
        let wp_id = &self.wp_id;
        outcome(operations::retry(&mut opened.door(), wp_id).await, |()| format!("{wp_id} will be dispatched again"))
    }
}

#[derive(clap::Args)]
#[group(required = true, multiple = false, id = "what")]
pub(crate) struct Cancel {
    /// The work package; running work is stopped (its agent is told) and its dependents are
    /// cancelled too.
    #[arg(group = "what")]
    wp_id: Option<String>,
    /// Every open, failed or running work package of this plan, and their dependents.
    #[arg(long, group = "what")]
    plan: Option<String>,
    #[command(flatten)]
    door: DoorArgs,
}

impl Cancel {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let roots = match (&self.wp_id, &self.plan) {
            (Some(w), _) => Roots::One(w),
            (None, Some(p)) => Roots::Plan(p),
            (None, None) => anyhow::bail!("name a work package or --plan"),
        };
        let opened = self.door.open().await?;
        outcome(operations::cancel(&mut opened.door(), roots).await, |o| {
            let mut s = format!("cancelled {}", o.cancelled.join(", "));
            if !o.running.is_empty() {
                s.push_str(&format!("\nstopped while running (their agents were told): {}", o.running.join(", ")));
            }
            if let Some(why) = &o.not_told {
                s.push_str(&format!("\nwarning: {why}"));
            }
            s
        })
    }
}

#[derive(clap::Args)]
pub(crate) struct Skip {
    wp_id: String,
    #[command(flatten)]
    door: DoorArgs,
}

impl Skip {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let opened = self.door.open().await?;
        let wp_id = &self.wp_id;
        outcome(operations::skip(&mut opened.door(), wp_id).await, |_| {
            format!("{wp_id} marked completed (skipped); what waited on it goes on")
        })
    }
}

#[derive(clap::Args)]
pub(crate) struct Rerun {
    /// A completed, failed or cancelled work package.
    wp_id: String,
    /// Also everything that depends on it, transitively.
    #[arg(long)]
    downstream: bool,
    #[command(flatten)]
    door: DoorArgs,
}

impl Rerun {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let opened = self.door.open().await?;
        outcome(operations::rerun(&mut opened.door(), &self.wp_id, self.downstream).await, |ids| {
            format!("runs again as a new attempt: {}", ids.join(", "))
        })
    }
}
