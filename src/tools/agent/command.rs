//! One run of the agent's command: what it is given (the payload on stdin, the small fields in
//! its environment, none of the agent's secrets), what comes back (its exit status and
//! bounded output), and its end when it runs too long or the agent stops.

use std::collections::BTreeMap;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::report::Captured;

/// The largest field value put in the environment. Linux refuses to start a program with one
/// environment string over 128 KiB; 4 KiB is ample for ids, names and parameters, and what
/// is larger is a document, which belongs on stdin like the payload.
const ENV_VALUE_MAX: usize = 4 << 10;

/// What the fields' variables may take together, and `GE_FIELDS_JSON` again: with up to 256
/// fields of 4 KiB, each value alone fits and their sum would not (Linux caps the whole
/// environment and arguments at a quarter of the stack limit, 2 MiB by default).
const ENV_TOTAL_MAX: usize = 64 << 10;

/// Fields the orchestrator sets, which get their place before the budget runs out.
const FIRST: [&str; 6] = ["wp_id", "dispatch_id", "attempt", "agent_id", "route", "source_id"];

/// The agent's own secrets and Redis settings, which its command does not get unless
/// `--pass-env` names them: a command that runs what an AI wrote has no business with the
/// orchestrator's Redis, database or admin token.
pub(crate) const WITHHELD: [&str; 5] = ["REDIS_URL", "DATABASE_URL", "GE_ADMIN_TOKEN", "GE_ADMIN_READ_TOKEN", "GE_REDIS_CA_CERT"];

/// `GE_<FIELD>`: upper-cased, any other character than a letter or digit as `_`.
fn env_name(field: &str) -> String {
    let cleaned: String = field.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("GE_{cleaned}")
}

/// The variables a trigger's fields give the command: `GE_<FIELD>` for each field but
/// `payload` of at most [`ENV_VALUE_MAX`] bytes (and no NUL, which an environment cannot
/// hold) while [`ENV_TOTAL_MAX`] allows, and the same fields as one JSON object in
/// `GE_FIELDS_JSON`.
pub(crate) fn field_env(fields: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let first = FIRST.iter().filter_map(|k| fields.get_key_value(*k));
    let rest = fields.iter().filter(|(k, _)| !FIRST.contains(&k.as_str()));
    let mut vars = Vec::new();
    let mut json = serde_json::Map::new();
    let (mut env_used, mut json_used) = (0, 2);
    for (k, v) in first.chain(rest) {
        if k == "payload" || v.len() > ENV_VALUE_MAX || v.contains('\0') {
            continue;
        }
        let name = env_name(k);
        let env_cost = name.len() + v.len() + 2;
        let json_cost = serde_json::Value::from(k.as_str()).to_string().len() + serde_json::Value::from(v.as_str()).to_string().len() + 2;
        if env_used + env_cost > ENV_TOTAL_MAX || json_used + json_cost > ENV_TOTAL_MAX {
            continue;
        }
        env_used += env_cost;
        json_used += json_cost;
        vars.push((name, v.clone()));
        json.insert(k.clone(), v.as_str().into());
    }
    vars.push(("GE_FIELDS_JSON".into(), serde_json::Value::Object(json).to_string()));
    vars
}

/// How to run the command once.
pub(crate) struct Run<'a> {
    pub program: &'a [String],
    pub env: Vec<(String, String)>,
    /// Those of [`WITHHELD`] the command gets all the same.
    pub pass_env: &'a [String],
    pub stdin: &'a [u8],
    /// Bytes kept of each end of stdout and of stderr.
    pub keep: usize,
    pub timeout: Option<Duration>,
}

pub(crate) enum Outcome {
    Exited {
        status: ExitStatus,
        stdout: Captured,
        stderr: Captured,
    },
    /// Killed, with its process group, when `timeout` ran out.
    TimedOut {
        after: Duration,
        stderr: Captured,
    },
    /// Killed, with its process group, because the agent is stopping.
    Stopped,
    /// It could not be started or waited for: running it again would not help.
    Unrunnable(anyhow::Error),
}

/// How long output is still read after the command has exited: a process it left behind
/// may hold its stdout open for ever.
const DRAIN: Duration = Duration::from_secs(2);

/// Runs the command to its end, its timeout, or `stop`. Stdin is written while stdout and
/// stderr are read: a command that writes more than a pipe holds before it reads would
/// otherwise wait on the agent while the agent waits on it.
pub(crate) async fn run(run: Run<'_>, stop: &CancellationToken) -> Outcome {
    let mut cmd = tokio::process::Command::new(&run.program[0]);
    for name in WITHHELD.iter().filter(|n| !run.pass_env.iter().any(|p| p == *n)) {
        cmd.env_remove(name);
    }
    cmd.args(&run.program[1..]).envs(run.env).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // A group of its own, so that what it starts can be killed with it.
    cmd.process_group(0);
    let mut child = match cmd.spawn().with_context(|| format!("cannot start {:?}", run.program[0])) {
        Ok(c) => c,
        Err(e) => return Outcome::Unrunnable(e),
    };
    let group = child.id();
    let (stdin, out, err) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let (mut stdout, mut stderr) = (Captured::new(run.keep), Captured::new(run.keep));
    let ended = {
        let feed = async {
            if let Some(mut pipe) = stdin {
                // A command that does not read stdin closes it early; that is not a failure.
                let _ = pipe.write_all(run.stdin).await;
            }
        };
        let mut io = pin!(async { tokio::join!(feed, read_into(out, &mut stdout), read_into(err, &mut stderr)) });
        let mut deadline = pin!(async {
            match run.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        });
        let mut io_done = false;
        let ended = loop {
            tokio::select! {
                _ = &mut io, if !io_done => io_done = true,
                status = child.wait() => break Ended::Exited(status),
                _ = &mut deadline => break Ended::TimedOut,
                _ = stop.cancelled() => break Ended::Stopped,
            }
        };
        if !matches!(ended, Ended::Exited(_)) {
            kill_group(group);
            let _ = child.wait().await;
        }
        if !io_done && !matches!(ended, Ended::Stopped) {
            let _ = tokio::time::timeout(DRAIN, io).await;
        }
        ended
    };
    match ended {
        Ended::Exited(Ok(status)) => Outcome::Exited { status, stdout, stderr },
        Ended::Exited(Err(e)) => Outcome::Unrunnable(anyhow::Error::new(e).context("waiting for the command")),
        Ended::TimedOut => Outcome::TimedOut { after: run.timeout.unwrap_or_default(), stderr },
        Ended::Stopped => Outcome::Stopped,
    }
}

enum Ended {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Stopped,
}

/// SIGKILL to the command's process group: the command and whatever it started that did not
/// leave the group.
fn kill_group(group: Option<u32>) {
    if let Some(pgid) = group.and_then(|g| i32::try_from(g).ok()) {
        // SAFETY: kill(2) of the process group this agent created for its own child.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

async fn read_into(pipe: Option<impl AsyncRead + Unpin>, into: &mut Captured) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0; 64 << 10];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        into.push(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_fields_at_the_cap_stay_within_the_budget_and_the_orchestrators_come_first() {
        let mut fields: BTreeMap<String, String> = (0..256).map(|i| (format!("a{i:03}"), "v".repeat(ENV_VALUE_MAX))).collect();
        fields.insert("wp_id".into(), "w".into());
        fields.insert("payload".into(), "p".into());
        fields.insert("nul".into(), "a\0b".into());
        let vars = field_env(&fields);
        let json = &vars.last().unwrap().1;
        assert!(json.len() <= ENV_TOTAL_MAX, "{}", json.len());
        assert!(vars.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= 2 * ENV_TOTAL_MAX + 32);
        assert_eq!(vars[0], ("GE_WP_ID".into(), "w".into()));
        assert!(vars.iter().all(|(k, _)| k != "GE_PAYLOAD" && k != "GE_NUL"));
        assert!(vars.len() > 10, "fields are left out only when the budget is spent");
    }
}
