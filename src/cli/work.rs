//! `status`, `retry`, `cancel` and `skip`: what the work is doing, and the operators' actions
//! on one work package.

use std::process::ExitCode;

use super::args::{DatabaseArg, redis_con};
use crate::engine::settings::Names;
use crate::engine::{store, streams};
use crate::ops::{reads, status};

#[derive(clap::Args)]
pub(crate) struct Status {
    wp_id: Option<String>,
    #[command(flatten)]
    db: DatabaseArg,
    /// Also count dead letters.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    #[arg(long, default_value_t = 200)]
    limit: i64,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    names: Names,
}

impl Status {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let pool = self.db.connect().await?;
        let deadletters = match &self.redis_url {
            Some(url) => Some(streams::len(&mut redis_con(url).await?, &self.names.deadletter).await?),
            None => None,
        };
        let overview = status::Overview {
            counts: reads::counts(&pool).await?,
            work_packages: reads::work_packages(&pool, self.wp_id.as_deref(), self.limit).await?,
            deadletters,
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&overview)?);
        } else {
            print!("{}", status::render(&overview));
        }
        Ok(ExitCode::SUCCESS)
    }
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
