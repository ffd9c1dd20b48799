//! `submit`: a plan's work packages to the incoming stream, optionally followed to the end.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::args::RedisArg;
use crate::engine::settings::Names;
use crate::engine::store;
use crate::tools::{plan, progress};

#[derive(clap::Args)]
pub(crate) struct Submit {
    plan: PathBuf,
    #[command(flatten)]
    redis: RedisArg,
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
}

impl Submit {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let plan = plan::Plan::load(&self.plan)?.with_prefix(&self.prefix);
        // Connect before submitting, so --wait without a database fails before any work is sent.
        let pool = match (self.wait, &self.database_url) {
            (true, Some(url)) => Some(store::connect(url, 2).await?),
            (true, None) => anyhow::bail!("submit --wait needs --database-url or DATABASE_URL to follow the plan"),
            (false, _) => None,
        };
        let mut con = self.redis.connect().await?;
        let incoming = &self.names.incoming;
        let ids = plan::submit(&mut con, incoming, &plan).await.context("submitting the plan")?;
        let first = ids.first().map(String::as_str).unwrap_or("-");
        let last = ids.last().map(String::as_str).unwrap_or("-");
        println!("submitted {} work packages to {incoming} ({first} .. {last})", ids.len());
        match pool {
            Some(pool) => progress::wait_for_plan(&pool, &plan.wp_ids(), super::shutdown_token()?).await,
            None => Ok(ExitCode::SUCCESS),
        }
    }
}
