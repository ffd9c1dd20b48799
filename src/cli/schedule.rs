//! `schedule add|remove|pause|resume|list` (contract v1.6): schedules that submit a plan on a
//! cron, written to PostgreSQL directly like pauses. Every replica reads them at its next
//! round (a quarter of a second).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::args::DatabaseArg;
use crate::engine::schedule_store::{self, Definition};
use crate::ops::status::{render_schedules as render, time};

#[derive(clap::Subcommand)]
pub(crate) enum Action {
    /// Add a schedule (or, with --replace, replace the one of that name).
    Add(Add),
    /// Remove a schedule; firings already decided are still submitted.
    Remove(Named),
    /// Pause a schedule: it fires no more until resumed.
    Pause(Named),
    /// Resume a paused schedule at its next firing (what came due meanwhile is not caught up).
    Resume(Named),
    /// Every schedule with its next firing.
    List(List),
}

#[derive(clap::Args)]
pub(crate) struct Add {
    /// 1 to 48 of A-Z a-z 0-9 _ -: each firing's wp_ids start with NAME-YYYYMMDDTHHMMSSZ.
    name: String,
    /// Five fields (minute hour day-of-month month day-of-week), or six with seconds first.
    #[arg(long)]
    cron: String,
    /// The time zone the cron expression is read in (IANA name).
    #[arg(long, default_value = "UTC")]
    timezone: String,
    /// The plan file to submit at each firing (read and checked now; the schedule keeps its text).
    #[arg(long)]
    plan: PathBuf,
    /// Firings missed while no replica ran: skip, or catch_up:N (the newest N of them, late).
    #[arg(long, default_value = "skip")]
    missed: String,
    /// A firing while the previous firing's run is still open: skip it, or start it all the same.
    #[arg(long, default_value = "skip")]
    overlap: String,
    /// Add it paused.
    #[arg(long)]
    paused: bool,
    /// Replace the schedule of that name if there is one.
    #[arg(long)]
    replace: bool,
    #[command(flatten)]
    db: DatabaseArg,
}

#[derive(clap::Args)]
pub(crate) struct Named {
    name: String,
    #[command(flatten)]
    db: DatabaseArg,
}

#[derive(clap::Args)]
pub(crate) struct List {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DatabaseArg,
}

impl Action {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Action::Add(a) => {
                let text = std::fs::read_to_string(&a.plan).with_context(|| format!("reading plan {}", a.plan.display()))?;
                let def = Definition {
                    cron: a.cron,
                    timezone: a.timezone,
                    plan: text,
                    plan_source: Some(a.plan.display().to_string()),
                    missed: a.missed,
                    overlap: a.overlap,
                    paused: a.paused,
                };
                let pool = a.db.connect().await?;
                let replaced = schedule_store::put(&pool, &a.name, &def, a.replace).await?;
                let view = schedule_store::list(&pool).await?.into_iter().find(|s| s.name == a.name);
                let next = view.map(|v| if v.paused { "paused".to_string() } else { time(v.next_firing) }).unwrap_or_default();
                println!("{} schedule {}; next firing: {next}", if replaced { "replaced" } else { "added" }, a.name);
                Ok(ExitCode::SUCCESS)
            }
            Action::Remove(n) => {
                if schedule_store::remove(&n.db.connect().await?, &n.name).await? {
                    println!("removed schedule {}", n.name);
                    Ok(ExitCode::SUCCESS)
                } else {
                    eprintln!("no schedule {}", n.name);
                    Ok(ExitCode::FAILURE)
                }
            }
            Action::Pause(n) => set_paused(n, true).await,
            Action::Resume(n) => set_paused(n, false).await,
            Action::List(l) => {
                let all = schedule_store::list(&l.db.connect().await?).await?;
                if l.json {
                    println!("{}", serde_json::to_string_pretty(&all)?);
                } else if all.is_empty() {
                    println!("no schedules");
                } else {
                    print!("{}", render(&all));
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

async fn set_paused(n: Named, paused: bool) -> anyhow::Result<ExitCode> {
    match schedule_store::set_paused(&n.db.connect().await?, &n.name, paused).await? {
        Some(v) if paused => {
            println!("paused schedule {}", v.name);
            Ok(ExitCode::SUCCESS)
        }
        Some(v) => {
            println!("resumed schedule {}; next firing: {}", v.name, time(v.next_firing));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("no schedule {}", n.name);
            Ok(ExitCode::FAILURE)
        }
    }
}
