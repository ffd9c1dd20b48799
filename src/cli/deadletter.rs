//! `deadletter list` and `deadletter requeue`.

use std::process::ExitCode;

use super::args::RedisArg;
use crate::engine::settings::Names;
use crate::ops::actions::{self, Requeue};

#[derive(clap::Subcommand)]
pub(crate) enum Action {
    /// Dead letters, newest first.
    List {
        #[command(flatten)]
        redis: RedisArg,
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
        #[command(flatten)]
        redis: RedisArg,
        #[command(flatten)]
        names: Names,
    },
}

impl Action {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Action::List { redis, limit, reason, json, names } => {
                let dls = actions::deadletters(&mut redis.connect().await?, &names.deadletter, limit, reason.as_deref()).await?;
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
                Ok(ExitCode::SUCCESS)
            }
            Action::Requeue { id, all, reason, redis, names } => {
                let mut con = redis.connect().await?;
                let outcomes = match (id, all) {
                    (Some(id), false) => vec![actions::requeue(&mut con, &names, &id).await?],
                    _ => actions::requeue_all(&mut con, &names, reason.as_deref()).await?,
                };
                let mut failed = false;
                for o in &outcomes {
                    match o {
                        Requeue::Requeued { id, stream, new_id } => println!("{id} requeued to {stream} as {new_id}"),
                        Requeue::NotFound { id } => {
                            eprintln!("{id}: no such dead letter (already requeued?)");
                            failed = true;
                        }
                        Requeue::Empty { id } => eprintln!("{id}: has no original fields to send again; left in place"),
                        Requeue::Cut { id } => {
                            eprintln!("{id}: values were cut when it was dead-lettered; resubmit it from its source; left in place");
                            failed = true;
                        }
                    }
                }
                if outcomes.is_empty() {
                    println!("no dead letters to requeue");
                }
                Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
            }
        }
    }
}
