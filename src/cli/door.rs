//! What the CLI's operator actions share: the connections the one door of `ops::operations`
//! needs (PostgreSQL for the change, Redis to tell agents and wake the replicas), and how an
//! action's refusal is shown.

use std::process::ExitCode;

use sqlx::PgPool;

use super::args::{DatabaseArg, RedisArg};
use crate::engine::settings::Names;
use crate::engine::streams::MasterConnection;
use crate::ops::operations::{Door, OpError};

#[derive(clap::Args)]
pub(crate) struct DoorArgs {
    #[command(flatten)]
    db: DatabaseArg,
    #[command(flatten)]
    redis: RedisArg,
    #[command(flatten)]
    names: Names,
}

pub(crate) struct Opened {
    pool: PgPool,
    redis: MasterConnection,
    names: Names,
}

impl DoorArgs {
    pub(crate) async fn open(self) -> anyhow::Result<Opened> {
        Ok(Opened { pool: self.db.connect().await?, redis: self.redis.connect().await?, names: self.names })
    }
}

impl Opened {
    pub(crate) fn door(&self) -> Door<'_> {
        Door { pool: &self.pool, redis: self.redis.clone(), names: &self.names, replica: None }
    }
}

/// Prints what an action did, or why it did nothing (exit status 1); fails on an outage.
pub(crate) fn outcome<T>(result: Result<T, OpError>, done: impl FnOnce(T) -> String) -> anyhow::Result<ExitCode> {
    match result {
        Ok(t) => {
            println!("{}", done(t));
            Ok(ExitCode::SUCCESS)
        }
        Err(OpError::NotFound(why) | OpError::Conflict(why) | OpError::Invalid(why)) => {
            eprintln!("{why}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}
