//! The reference agent: reads `triggers.NAME` with its own consumer group, runs a command once
//! per trigger (payload on stdin, small fields in the environment) and reports the outcome to
//! `ge:work:completed` or `ge:work:failed` by exit status. Here: its settings and its loop over
//! triggers (its own pending ones, new ones, abandoned ones); `command` runs one, `report`
//! makes the text of the report, `liveness` is what goes on while a command runs.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::core::entry::{RawFields, StreamEntry};
use crate::engine::backoff::Backoff;
use crate::engine::settings::Names;
use crate::engine::streams::{self, Reader, Trouble};

mod cancel;
mod command;
mod handled;
mod liveness;
mod progress;
mod report;
mod trace_env;
mod usage;

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
    /// Consumer name in the group; default NAME. A restart under the same name runs first the
    /// triggers it had taken; several instances of one agent need one name each.
    #[arg(long, env = "GE_AGENT_CONSUMER")]
    pub consumer: Option<String>,
    /// A trigger pending in the group this long is taken over (its consumer is gone);
    /// triggers being worked on are kept fresh meanwhile. `off` for never.
    #[arg(long, env = "GE_AGENT_CLAIM_IDLE", default_value = "60s", value_parser = duration_or_off)]
    pub claim_idle: Duration,
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
    /// While a command runs, a heartbeat for its dispatch goes to the heartbeat stream this
    /// often; `off` (or 0) for none.
    #[arg(long, env = "GE_AGENT_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = duration_or_off)]
    pub heartbeat_interval: Duration,
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
    progress_file: Option<&std::path::Path>,
    stop: &CancellationToken,
) -> Option<(bool, Vec<(&'static str, String)>)> {
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let payload = get("payload");
    let cap = args.max_report_bytes;
    // (v1.6) Where the command may write what it used.
    let usage = usage::UsageFile::create();
    let mut env = command::field_env(fields);
    env.retain(|(k, _)| k != usage::VAR);
    env.extend(usage.as_ref().map(usage::UsageFile::env));
    env.extend(progress_file.map(|p| ("GE_PROGRESS_FILE".to_string(), p.display().to_string())));
    env.extend(trace_env::vars(fields));
    let run = command::Run {
        program: &args.command,
        env,
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
    report.extend(usage.map(|u| u.fields()).unwrap_or_default());
    Some((ok, report))
}

/// The `error` of a failure: what happened, then the command's stderr.
fn failure(what: &str, stderr: &Captured, cap: usize) -> String {
    if stderr.is_empty() { fit(what, stderr, cap) } else { fit(&format!("{what}: "), stderr, cap) }
}

fn decode(fields: &RawFields) -> BTreeMap<String, String> {
    fields.iter().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned())).collect()
}

/// One agent process: its consumer of the trigger stream, and the connection it reports on.
struct Agent {
    args: AgentArgs,
    stream: String,
    group: String,
    consumer: String,
    con: streams::MasterConnection,
    cancels: cancel::Cancels,
    handled: handled::Handled,
}

impl Agent {
    /// Runs the command for one trigger and reports the outcome, acknowledging the trigger in
    /// the same MULTI/EXEC. False when the agent is stopping: the trigger is left pending.
    async fn handle(&mut self, e: &StreamEntry, token: &CancellationToken, backoff: &mut Backoff) -> bool {
        let (target, reports) = match &e.fields {
            // Deleted from the stream while pending: there is nothing to run.
            None => (self.args.names.failed.clone(), Vec::new()),
            Some(raw) => {
                let fields = decode(raw);
                let wp_id = fields.get("wp_id").cloned().unwrap_or_default();
                let dispatch_id = fields.get("dispatch_id").map(String::as_str).unwrap_or("");
                if let Some((target, report)) = self.handled.get(dispatch_id) {
                    tracing::warn!(
                        wp_id,
                        dispatch_id,
                        "trigger of a dispatch this agent has run delivered again (a Redis failover?); its report is sent again, the command not run"
                    );
                    let (target, report) = (target.clone(), report.clone());
                    return self.report(&target, &[report], e, token, backoff).await;
                }
                let watch = self.cancels.watch(dispatch_id, token);
                let beat = [("wp_id", wp_id.as_str()), ("dispatch_id", dispatch_id), ("agent_id", self.args.name.as_str())];
                let beats =
                    liveness::heartbeats(self.con.clone(), &self.args.names.heartbeat, &beat, enabled(self.args.heartbeat_interval));
                let keep = liveness::keep_claimed(self.con.clone(), &self.stream, &self.group, &self.consumer, &e.id, self.touch_every());
                // (v1.6) What the command writes to GE_PROGRESS_FILE goes out on heartbeats.
                let file = progress::ProgressFile::new().map_err(|e| tracing::warn!(error = %e, "no progress file")).ok();
                let path = file.as_ref().map(|f| f.path.clone());
                let forward = async {
                    match &path {
                        Some(p) => progress::forward(self.con.clone(), &self.args.names.heartbeat, &beat, p).await,
                        None => std::future::pending().await,
                    }
                };
                // A trigger cancelled before it started does not start.
                let outcome = if watch.cancelled() {
                    None
                } else {
                    tokio::select! {
                        outcome = run_one(&self.args, &fields, path.as_deref(), watch.token()) => outcome,
                        never = beats => match never {},
                        never = keep => match never {},
                        never = forward => match never {},
                    }
                };
                drop(file);
                match outcome {
                    Some((ok, report)) => {
                        tracing::info!(wp_id, dispatch_id, ok, "trigger handled");
                        let target = if ok { &self.args.names.completed } else { &self.args.names.failed };
                        self.handled.insert(dispatch_id, (target.clone(), report.clone()));
                        (target.clone(), vec![report])
                    }
                    // Cancelled (v1.6): acknowledged, and nothing is reported.
                    None if watch.cancelled() => (self.args.names.failed.clone(), Vec::new()),
                    None => {
                        tracing::info!(wp_id, "stopped during the command; the trigger stays pending");
                        return false;
                    }
                }
            }
        };
        self.report(&target, &reports, e, token, backoff).await
    }

    /// Sends `reports` to `target` and acknowledges the trigger, in one MULTI/EXEC, until Redis
    /// takes them. False when the agent is stopping.
    async fn report(
        &mut self,
        target: &str,
        reports: &[Vec<(&'static str, String)>],
        e: &StreamEntry,
        token: &CancellationToken,
        backoff: &mut Backoff,
    ) -> bool {
        while let Err(err) = streams::report_and_ack(&mut self.con, target, reports, &self.stream, &self.group, &[&e.id]).await {
            tracing::warn!(error = %err, "agent cannot report; retrying");
            if token.is_cancelled() {
                return false;
            }
            backoff.wait(token).await;
        }
        backoff.reset();
        true
    }

    /// How often a trigger being worked on is claimed again, so that it never looks
    /// abandoned to another instance of this agent.
    fn touch_every(&self) -> Option<Duration> {
        enabled(self.args.claim_idle).map(|idle| idle / 4)
    }

    /// Claims, one at a time, the triggers pending in the group for longer than
    /// `--claim-idle` (their consumer is gone, e.g. an instance under another name) and
    /// handles them. False when the agent is stopping.
    async fn claim_abandoned(&mut self, idle: Duration, token: &CancellationToken, backoff: &mut Backoff) -> bool {
        let mut cursor = "0-0".to_string();
        loop {
            // One at a time: a claimed trigger waiting behind a long command would look
            // abandoned in its turn.
            let page = streams::autoclaim(&mut self.con, &self.stream, &self.group, &self.consumer, idle, &cursor, 1).await;
            let (next, entries, deleted) = match page {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(error = %err, "agent cannot claim abandoned triggers; trying again later");
                    return true;
                }
            };
            if !deleted.is_empty() {
                tracing::info!(?deleted, "abandoned triggers were deleted from the stream; nothing to run");
            }
            for e in &entries {
                tracing::info!(id = %e.id, "claimed a trigger its consumer left pending");
                if !self.handle(e, token, backoff).await {
                    return false;
                }
            }
            if next == "0-0" {
                return true;
            }
            cursor = next;
        }
    }
}

pub async fn run(args: AgentArgs, token: CancellationToken) -> anyhow::Result<()> {
    let endpoint = streams::Endpoint::parse(&args.redis_url)?;
    let stream = args.names.trigger_stream(&args.name);
    let group = args.agent_group.clone().unwrap_or_else(|| format!("agent-{}", args.name));
    let consumer = args.consumer.clone().unwrap_or_else(|| args.name.clone());
    let mut con = streams::MasterConnection::connect(&endpoint).await.context("connecting to Redis")?;
    streams::ensure_group(&mut con, &stream, &group).await.context("creating the agent's consumer group")?;
    tracing::info!(agent = %args.name, stream = %stream, consumer = %consumer, "agent started");
    // One trigger per read: one that waited behind a long command would look abandoned.
    let endpoint_for_cancels = endpoint.clone();
    let mut reader =
        Reader::new(endpoint, &stream, &group, &consumer, 1, Duration::from_secs(1)).own_first_after_reconnect().on_trouble(|trouble| {
            match trouble {
                Trouble::Connect(e) => tracing::warn!(error = %e, "agent cannot connect; retrying"),
                Trouble::GroupMissing(e) | Trouble::Read(e) => tracing::warn!(error = %e, "agent read failed; retrying"),
                Trouble::GroupRecreated(_) => {}
            }
        });
    let claim_idle = enabled(args.claim_idle);
    let cancels = cancel::Cancels::follow(endpoint_for_cancels, args.names.cancel_stream(&args.name), token.clone()).await;
    let mut agent = Agent { args, stream, group, consumer, con, cancels, handled: handled::Handled::default() };
    while !token.is_cancelled() {
        if let Some(idle) = claim_idle
            && !agent.claim_abandoned(idle, &token, &mut reader.backoff).await
        {
            break;
        }
        // Reads until the next sweep for abandoned triggers is due; the reader stops only
        // between reads, so no delivered trigger is dropped.
        let round = token.child_token();
        let sweep = claim_idle.map(|idle| {
            let round = round.clone();
            tokio::spawn(async move {
                tokio::time::sleep(idle / 2).await;
                round.cancel();
            })
        });
        'round: while let Some(entries) = reader.next(&round).await {
            for e in &entries {
                if !agent.handle(e, &token, &mut reader.backoff).await {
                    break 'round;
                }
            }
        }
        if let Some(s) = sweep {
            s.abort();
        }
    }
    Ok(())
}
