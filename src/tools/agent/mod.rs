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
    /// A command still running after this long is killed, with its process group, and
    /// reported as a retryable failure; `off` (or 0) lets it run for ever.
    #[arg(long, env = "GE_AGENT_TIMEOUT", default_value = "1h", value_parser = duration_or_off)]
    pub timeout: Duration,
    #[command(flatten)]
    pub names: Names,
    /// The command to run for each trigger, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `off` or a humantime duration; zero means off.
fn duration_or_off(s: &str) -> Result<Duration, humantime::DurationError> {
    if s == "off" { Ok(Duration::ZERO) } else { humantime::parse_duration(s) }
}

fn enabled(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Runs the command for one trigger and returns the report: (completed, fields). None when
/// the agent stopped meanwhile: the trigger stays pending and runs again at the next start.
async fn run_one(
    args: &AgentArgs,
    fields: &BTreeMap<String, String>,
    stop: &CancellationToken,
) -> Option<(bool, Vec<(&'static str, String)>)> {
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let payload = get("payload");
    let cap = args.max_report_bytes;
    let run = command::Run {
        program: &args.command,
        env: command::field_env(fields),
        pass_env: &args.pass_env,
        stdin: payload.as_bytes(),
        keep: cap,
        timeout: enabled(args.timeout),
    };
    let mut report = vec![("wp_id", get("wp_id")), ("dispatch_id", get("dispatch_id")), ("agent_id", args.name.clone())];
    let (ok, text, retryable) = match command::run(run, stop).await {
        Outcome::Exited { status, stdout, .. } if status.success() => (true, fit("", &stdout, cap), true),
        Outcome::Exited { status, stderr, .. } => (false, failure(&status.to_string(), &stderr, cap), true),
        Outcome::TimedOut { after, stderr } => {
            let what = format!("timed out after {}; killed with its process group", humantime::format_duration(after));
            (false, failure(&what, &stderr, cap), true)
        }
        Outcome::Unrunnable(e) => (false, failure(&format!("{e:#}"), &Captured::new(0), cap), false),
        Outcome::Stopped => return None,
    };
    if ok {
        report.push(("result", text));
    } else {
        report.push(("error", text));
        report.push(("retryable", retryable.to_string()));
    }
    Some((ok, report))
}

/// The `error` of a failure: what happened, then the command's stderr.
fn failure(what: &str, stderr: &Captured, cap: usize) -> String {
    if stderr.is_empty() { fit(what, stderr, cap) } else { fit(&format!("{what}: "), stderr, cap) }
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
            let Some((ok, report)) = run_one(&args, &fields, &token).await else {
                tracing::info!(
                    wp_id = fields.get("wp_id").map(String::as_str).unwrap_or(""),
                    "stopped during the command; the trigger stays pending"
                );
                return Ok(());
            };
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
