//! `budget` (contract v1.6): a plan's budget, set or removed in PostgreSQL directly like
//! `pause`, and spend against every budget. Work a budget held goes at the replicas' next
//! sweep; the admin API's change also starts a dispatch round at once.

use std::process::ExitCode;

use crate::cli::args::DatabaseArg;
use crate::engine::budgets;
use crate::ops::status;

#[derive(clap::Subcommand)]
pub(crate) enum Action {
    /// Set a plan's budget in USD (e.g. 25.00): once its spend reaches it, no more of its work
    /// is dispatched until the budget is raised or removed.
    Set {
        plan: String,
        usd: String,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Remove a plan's budget; the work it held goes on.
    Remove {
        plan: String,
        #[command(flatten)]
        db: DatabaseArg,
    },
    /// Spend per agent and plan, and every budget with what is spent of it.
    Show {
        #[command(flatten)]
        db: DatabaseArg,
        /// The routing file, for the agents' budgets.
        #[arg(long = "config", env = "GE_ROUTING_CONFIG")]
        config: Option<std::path::PathBuf>,
        /// The plans shown, those that spent most first.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

fn check_plan(plan: &str) -> anyhow::Result<()> {
    if plan.is_empty() || plan.len() > 128 || plan.contains('\0') {
        anyhow::bail!("a plan is 1 to 128 bytes, without NUL");
    }
    Ok(())
}

impl Action {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Action::Set { plan, usd, db } => {
                check_plan(&plan)?;
                let usd = crate::core::usage::parse_usd(&usd).map_err(|e| anyhow::anyhow!("usd {e}"))?;
                let now = budgets::set_plan(&db.connect().await?, &plan, Some(&usd)).await?;
                match now {
                    Some(s) if s.reached => println!("{}; its work stays held", s.wait_reason()),
                    Some(s) => {
                        println!("budget of plan {plan}: {} of {usd} USD spent; held work goes at the replicas' next sweep", s.spent)
                    }
                    None => println!("budget of plan {plan} set to {usd} USD"),
                }
            }
            Action::Remove { plan, db } => {
                check_plan(&plan)?;
                budgets::set_plan(&db.connect().await?, &plan, None).await?;
                println!("plan {plan} has no budget; held work goes at the replicas' next sweep");
            }
            Action::Show { db, config, limit, json } => {
                let routing = config.as_deref().map(crate::core::routing_file::load).transpose()?;
                let o = budgets::overview(&db.connect().await?, routing.as_ref(), 0.8, limit).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&o)?);
                } else {
                    let text = status::render_spend(&o);
                    print!(
                        "{}",
                        if text.is_empty() { "no spend recorded and no budgets\n".to_string() } else { text.trim_start().to_string() }
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
