//! (v1.6) `approve`, `reject` and `event`: ending the waits of work packages that wait for a
//! person or an outside event. Straight to PostgreSQL, like `retry` and `skip`; the replicas'
//! next sweep dispatches what they unblock.

use std::process::ExitCode;

use super::args::DatabaseArg;
use crate::engine::waits::{self, WaitError};

#[derive(clap::Args)]
pub(crate) struct Decide {
    wp_id: String,
    /// Why: kept in the result the dependents receive, and in the history.
    #[arg(long)]
    comment: Option<String>,
    /// Who decides (default: $USER).
    #[arg(long, env = "USER", default_value = "cli")]
    by: String,
    #[command(flatten)]
    db: DatabaseArg,
}

impl Decide {
    pub async fn approve(self) -> anyhow::Result<ExitCode> {
        let pool = self.db.connect().await?;
        report(waits::approve(&pool, &self.wp_id, &self.by, self.comment.as_deref()).await, &self.wp_id, "approved")
    }

    pub async fn reject(self) -> anyhow::Result<ExitCode> {
        let pool = self.db.connect().await?;
        report(waits::reject(&pool, &self.wp_id, &self.by, self.comment.as_deref()).await, &self.wp_id, "rejected")
    }
}

fn report(r: Result<Vec<String>, WaitError>, wp_id: &str, done: &str) -> anyhow::Result<ExitCode> {
    match r {
        Ok(_) => {
            println!("{wp_id} {done}");
            Ok(ExitCode::SUCCESS)
        }
        Err(WaitError::Db(e)) => Err(e.into()),
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct EventCmd {
    /// The key the work packages wait for (their wait_key).
    key: String,
    /// The event's fields, as NAME=VALUE: the result of the work packages it completes.
    fields: Vec<String>,
    #[command(flatten)]
    db: DatabaseArg,
}

impl EventCmd {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let mut fields = serde_json::Map::new();
        for f in &self.fields {
            let Some((k, v)) = f.split_once('=') else { anyhow::bail!("field {f:?} is not NAME=VALUE") };
            fields.insert(k.to_string(), v.into());
        }
        fields.insert("key".into(), self.key.clone().into());
        let pool = self.db.connect().await?;
        match waits::deliver(&pool, &self.key, &serde_json::Value::Object(fields), None).await {
            Ok(d) if d.kept => println!("no work package waits for {} yet: the event is kept for it", self.key),
            Ok(d) => println!("completed {}", d.completed.join(", ")),
            Err(WaitError::Db(e)) => return Err(e.into()),
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
