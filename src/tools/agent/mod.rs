//! The reference agent: reads `triggers.NAME` with its own consumer group, runs a command once
//! per trigger (payload on stdin, small fields in the environment) and reports the outcome to
//! `ge:work:completed` or `ge:work:failed` by exit status.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::core::entry::StreamEntry;
use crate::engine::settings::Names;
use crate::engine::streams::{self, Reader, Trouble};

mod command;
mod report;

use command::Outcome;
use report::{Captured, fit};

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The agent's name in the routing file; it reads `triggers.NAME`.
    pub name: String,
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,
    /// Consumer group of this agent on its trigger stream; default `agent-NAME`.
    #[arg(long)]
    pub agent_group: Option<String>,
    #[arg(long)]
    pub consumer: Option<String>,
    /// Cap on a report's `result` and `error`, in bytes: the orchestrator's
    /// `GE_MAX_FIELD_BYTES`, over which it dead-letters the report.
    #[arg(long, env = "GE_AGENT_MAX_REPORT_BYTES", default_value_t = 64 << 10)]
    pub max_report_bytes: usize,
    /// Gives the command a variable of the agent's that it is otherwise not given; repeatable.
    #[arg(long, env = "GE_AGENT_PASS_ENV", value_delimiter = ',', value_name = "NAME",
          value_parser = clap::builder::PossibleValuesParser::new(command::WITHHELD))]
    pub pass_env: Vec<String>,
    #[command(flatten)]
    pub names: Names,
    /// The command to run for each trigger, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the command for one trigger and returns the report: (completed, fields).
async fn run_one(args: &AgentArgs, fields: &BTreeMap<String, String>) -> (bool, Vec<(&'static str, String)>) {
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let payload = get("payload");
    let cap = args.max_report_bytes;
    let run = command::Run {
        program: &args.command,
        env: command::field_env(fields),
        pass_env: &args.pass_env,
        stdin: payload.as_bytes(),
        keep: cap,
    };
    let mut report = vec![("wp_id", get("wp_id")), ("dispatch_id", get("dispatch_id")), ("agent_id", args.name.clone())];
    match command::run(run).await {
        Outcome::Exited { status, stdout, .. } if status.success() => {
            report.push(("result", fit("", &stdout, cap)));
            (true, report)
        }
        Outcome::Exited { status, stderr, .. } => {
            let prefix = if stderr.is_empty() { status.to_string() } else { format!("{status}: ") };
            report.push(("error", fit(&prefix, &stderr, cap)));
            report.push(("retryable", "true".into()));
            (false, report)
        }
        Outcome::Unrunnable(e) => {
            report.push(("error", fit(&format!("{e:#}"), &Captured::new(0), cap)));
            report.push(("retryable", "false".into()));
            (false, report)
        }
    }
}

fn decode(e: &StreamEntry) -> BTreeMap<String, String> {
    e.fields.iter().flatten().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned())).collect()
}

pub async fn run(args: AgentArgs, token: CancellationToken) -> anyhow::Result<()> {
    let client = streams::client(&args.redis_url)?;
    let stream = args.names.trigger_stream(&args.name);
    let group = args.agent_group.clone().unwrap_or_else(|| format!("agent-{}", args.name));
    let consumer = args.consumer.clone().unwrap_or_else(crate::engine::settings::default_consumer_name);
    let mut manager = streams::manager(&client).await.context("connecting to Redis")?;
    streams::ensure_group(&mut manager, &stream, &group).await.context("creating the agent's consumer group")?;
    tracing::info!(agent = %args.name, stream = %stream, "agent started");
    let mut reader = Reader::new(client, &stream, &group, &consumer, 16, Duration::from_secs(1)).on_trouble(|trouble| match trouble {
        Trouble::Connect(e) => tracing::warn!(error = %e, "agent cannot connect; retrying"),
        Trouble::GroupMissing(e) | Trouble::Read(e) => tracing::warn!(error = %e, "agent read failed; retrying"),
        Trouble::GroupRecreated(_) => {}
    });
    while let Some(entries) = reader.next(&token).await {
        for e in &entries {
            let fields = decode(e);
            let (ok, report) = run_one(&args, &fields).await;
            let target = if ok { &args.names.completed } else { &args.names.failed };
            tracing::info!(
                wp_id = fields.get("wp_id").map(String::as_str).unwrap_or(""),
                dispatch_id = fields.get("dispatch_id").map(String::as_str).unwrap_or(""),
                ok,
                "trigger handled"
            );
            while let Err(err) =
                streams::report_and_ack(&mut manager, target, std::slice::from_ref(&report), &stream, &group, &[&e.id]).await
            {
                tracing::warn!(error = %err, "agent cannot report; retrying");
                if token.is_cancelled() {
                    return Ok(());
                }
                reader.backoff.wait(&token).await;
            }
            reader.backoff.reset();
        }
    }
    Ok(())
}
