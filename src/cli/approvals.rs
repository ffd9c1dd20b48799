//! (v1.6) `approve`, `reject` and `event`: ending the waits of work packages that wait for a
//! person or an outside event, through the one door of `ops::operations` (which wakes the
//! replicas to dispatch what they unblock).

use std::process::ExitCode;

use super::door::{DoorArgs, outcome};
use crate::engine::waits::Verdict;
use crate::ops::operations;

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
    door: DoorArgs,
}

impl Decide {
    pub async fn approve(self) -> anyhow::Result<ExitCode> {
        self.decide(Verdict::Approve, "approved").await
    }

    pub async fn reject(self) -> anyhow::Result<ExitCode> {
        self.decide(Verdict::Reject, "rejected").await
    }

    async fn decide(self, verdict: Verdict, done: &str) -> anyhow::Result<ExitCode> {
        let opened = self.door.open().await?;
        let result = operations::decide(&mut opened.door(), &self.wp_id, &self.by, self.comment.as_deref(), verdict).await;
        outcome(result, |_| format!("{} {done}", self.wp_id))
    }
}

#[derive(clap::Args)]
pub(crate) struct EventCmd {
    /// The key the work packages wait for (their wait_key).
    key: String,
    /// The event's fields, as NAME=VALUE: the result of the work packages it completes.
    fields: Vec<String>,
    #[command(flatten)]
    door: DoorArgs,
}

impl EventCmd {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let mut fields = serde_json::Map::new();
        for f in &self.fields {
            let Some((k, v)) = f.split_once('=') else { anyhow::bail!("field {f:?} is not NAME=VALUE") };
            fields.insert(k.to_string(), v.into());
        }
        fields.insert("key".into(), self.key.clone().into());
        let opened = self.door.open().await?;
        let result = operations::event(&mut opened.door(), &self.key, &serde_json::Value::Object(fields)).await;
        outcome(result, |d| {
            if d.kept {
                format!("no work package waits for {} yet: the event is kept for it", self.key)
            } else {
                format!("completed {}", d.completed.join(", "))
            }
        })
    }
}
