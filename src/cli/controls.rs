//! `pause`, `resume` and `pauses` (contract v1.4): pauses of agents, lanes and plans, through
//! the one door of `ops::operations`, so that a resume from here wakes the replicas' dispatch
//! as one through the admin API does.

use std::process::ExitCode;

use crate::cli::args::DatabaseArg;
use crate::cli::door::{DoorArgs, outcome};
use crate::engine::controls::{self, Pause, PauseScope};
use crate::ops::operations;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum Scope {
    Agent,
    Lane,
    Plan,
}

impl From<Scope> for PauseScope {
    fn from(s: Scope) -> Self {
        match s {
            Scope::Agent => PauseScope::Agent,
            Scope::Lane => PauseScope::Lane,
            Scope::Plan => PauseScope::Plan,
        }
    }
}

fn show(p: &Pause) -> String {
    let reason = p.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
    format!("{} {} paused since {}{reason}", p.scope, p.name, p.paused_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

#[derive(clap::Args)]
pub(crate) struct PauseCmd {
    /// agent, lane or plan.
    scope: Scope,
    /// Its name (a plan is named by its `plan` field, else its wp_ids up to their last dot).
    name: String,
    /// Why, shown with every work package it holds.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    db: DatabaseArg,
}

impl PauseCmd {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        if self.name.is_empty() || self.name.chars().count() > 128 || self.name.contains('\0') {
            anyhow::bail!("the name must be 1 to 128 characters, without NUL");
        }
        outcome(operations::pause(&self.db.connect().await?, self.scope.into(), &self.name, self.reason.as_deref()).await, |p| show(&p))
    }
}

#[derive(clap::Args)]
pub(crate) struct ResumeCmd {
    /// agent, lane or plan.
    scope: Scope,
    name: String,
    #[command(flatten)]
    door: DoorArgs,
}

impl ResumeCmd {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let scope: PauseScope = self.scope.into();
        let opened = self.door.open().await?;
        outcome(operations::resume(&mut opened.door(), scope, &self.name).await, |_| format!("resumed {} {}", scope.as_str(), self.name))
    }
}

#[derive(clap::Args)]
pub(crate) struct PausesCmd {
    #[command(flatten)]
    db: DatabaseArg,
}

impl PausesCmd {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let all = controls::pauses(&self.db.connect().await?).await?;
        if all.is_empty() {
            println!("nothing is paused");
        }
        for p in &all {
            println!("{}", show(p));
        }
        Ok(ExitCode::SUCCESS)
    }
}
