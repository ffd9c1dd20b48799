//! `check-config` and `route`: the routing file and the router, without Redis or PostgreSQL.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::args::RoutingArg;
use crate::core::{router, routing_file};

#[derive(clap::Args)]
pub(crate) struct CheckConfig {
    file: PathBuf,
}

impl CheckConfig {
    pub fn run(self) -> ExitCode {
        match routing_file::load(&self.file) {
            Ok(table) => {
                print!("{}", table.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct Route {
    #[command(flatten)]
    routing: RoutingArg,
    /// Print the reasoning, not only the agent.
    #[arg(long)]
    explain: bool,
    /// Work in flight per agent, as agent=N, to see caps at work.
    #[arg(long = "in-flight", value_parser = parse_kv)]
    in_flight: Vec<(String, String)>,
    /// Entry fields as field=value (agent_id, work_type, trigger).
    #[arg(value_parser = parse_kv)]
    fields: Vec<(String, String)>,
}

impl Route {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let table = self.routing.load()?;
        let get = |k: &str| self.fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty());
        let loads: Vec<(String, u32)> = self
            .in_flight
            .iter()
            .map(|(a, n)| n.parse().map(|n| (a.clone(), n)).with_context(|| format!("--in-flight {a}={n}: not a number")))
            .collect::<anyhow::Result<_>>()?;
        let load = |a: &str| loads.iter().find(|(x, _)| x == a).map(|(_, n)| *n).unwrap_or(0);
        let req = router::RouteRequest { agent_id: get("agent_id"), work_type: get("work_type"), trigger: get("trigger") };
        match router::route(&req, &table, &load) {
            router::Decision::Dispatch { agent, kind, reason } => {
                if self.explain {
                    println!("dispatch to {agent} (route {})\n  because {reason}", kind.as_str());
                } else {
                    println!("{agent}");
                }
            }
            router::Decision::Wait { kind, candidates, reason } => {
                println!("wait as ready (route {}; candidates {})\n  because {reason}", kind.as_str(), candidates.join(", "));
            }
            router::Decision::DeadLetter { reason, detail } => {
                println!("dead-letter as {}\n  because {detail}", reason.as_str());
                return Ok(ExitCode::from(2));
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("expected field=value, got {s:?}"))
}
