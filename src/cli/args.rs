//! Arguments that several commands share: where Redis and PostgreSQL are, and the routing file.

use std::path::PathBuf;

use sqlx::PgPool;

use crate::core::routing_file::{self, RoutingTable};
use crate::engine::{store, streams};

/// The Redis of the orchestrator.
#[derive(clap::Args, Debug)]
pub(crate) struct RedisArg {
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,
}

impl RedisArg {
    pub async fn connect(&self) -> anyhow::Result<streams::MasterConnection> {
        redis_con(&self.redis_url).await
    }
}

/// The PostgreSQL database of the orchestrator.
#[derive(clap::Args, Debug)]
pub(crate) struct DatabaseArg {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

impl DatabaseArg {
    /// A small pool: an operator's command runs a few statements.
    pub async fn connect(&self) -> anyhow::Result<PgPool> {
        store::connect(&self.database_url, 2).await
    }
}

/// The routing file a command reads.
#[derive(clap::Args, Debug)]
pub(crate) struct RoutingArg {
    #[arg(long = "config", env = "GE_ROUTING_CONFIG", default_value = "config/dolly-routing.yaml")]
    pub config: PathBuf,
}

impl RoutingArg {
    pub fn load(&self) -> anyhow::Result<RoutingTable> {
        Ok(routing_file::load(&self.config)?)
    }
}

pub(crate) async fn redis_con(url: &str) -> anyhow::Result<streams::MasterConnection> {
    streams::connect(url).await
}
