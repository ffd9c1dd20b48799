//! Cancel notices (contract v1.6): the orchestrator appends `{wp_id, dispatch_id, reason}` to
//! `cancels.NAME` when an operator cancels a dispatch of this agent. A task of its own follows
//! that stream with a blocking `XREAD` (no group: every instance of the agent must hear every
//! notice), so a notice reaches a command that is running within the read's round trip. The
//! command is then killed with its process group and its trigger acknowledged without a report.
//! A trigger whose notice came first (published by a replica that claimed it just before the
//! cancel) is acknowledged without running at all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::backoff::Backoff;
use crate::engine::streams::{self, Endpoint};

/// How many cancelled dispatch_ids an agent remembers; the stream keeps about as many.
const REMEMBER: usize = 10_000;

/// How long the agent waits at start for the notices already in the stream before it takes
/// triggers anyway (Redis being slow to answer must not stop the agent).
const CATCH_UP: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    order: VecDeque<String>,
    cancelled: HashSet<String>,
    running: HashMap<String, CancellationToken>,
}

/// The dispatches cancelled so far, and the running ones to stop when theirs comes.
#[derive(Clone, Default)]
pub(super) struct Cancels(Arc<Mutex<State>>);

impl Cancels {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, dispatch_id: String) {
        let mut s = self.state();
        if let Some(run) = s.running.get(&dispatch_id) {
            tracing::info!(dispatch_id, "cancelled by an operator; killing the command with its process group");
            run.cancel();
        }
        if s.cancelled.insert(dispatch_id.clone()) {
            s.order.push_back(dispatch_id);
            if s.order.len() > REMEMBER
                && let Some(old) = s.order.pop_front()
            {
                s.cancelled.remove(&old);
            }
        }
    }

    /// A token for the run of `dispatch_id`: cancelled when the agent stops (`stop`) or when
    /// the dispatch is cancelled. Forgotten when the run ends.
    pub(super) fn watch(&self, dispatch_id: &str, stop: &CancellationToken) -> Watch {
        let token = stop.child_token();
        let mut s = self.state();
        if s.cancelled.contains(dispatch_id) {
            token.cancel();
        }
        s.running.insert(dispatch_id.to_string(), token.clone());
        Watch { cancels: self.clone(), dispatch_id: dispatch_id.to_string(), token, stop: stop.clone() }
    }

    /// Follows `stream` until `stop`, from its start (the stream is capped); returns once what
    /// the stream held is read, or after [`CATCH_UP`].
    pub(super) async fn follow(endpoint: Endpoint, stream: String, stop: CancellationToken) -> Cancels {
        let cancels = Cancels::default();
        let (caught_up, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(read_notices(cancels.clone(), endpoint, stream, stop, caught_up));
        let _ = tokio::time::timeout(CATCH_UP, ready).await;
        cancels
    }
}

/// The run of one dispatch, as [`Cancels::watch`] gave it.
pub(super) struct Watch {
    cancels: Cancels,
    dispatch_id: String,
    token: CancellationToken,
    stop: CancellationToken,
}

impl Watch {
    pub(super) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Whether the run ended because its dispatch was cancelled (not because the agent stops).
    pub(super) fn cancelled(&self) -> bool {
        self.token.is_cancelled() && !self.stop.is_cancelled()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.cancels.state().running.remove(&self.dispatch_id);
    }
}

async fn read_notices(
    cancels: Cancels,
    endpoint: Endpoint,
    stream: String,
    stop: CancellationToken,
    caught_up: tokio::sync::oneshot::Sender<()>,
) {
    let mut caught_up = Some(caught_up);
    let mut last = "0-0".to_string();
    let mut backoff = Backoff::default();
    while !stop.is_cancelled() {
        let con = match endpoint.client().await {
            Ok(client) => streams::blocking(&client).await,
            Err(e) => Err(e),
        };
        let mut con = match con {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "agent cannot connect to read cancel notices; retrying");
                backoff.wait(&stop).await;
                continue;
            }
        };
        loop {
            // Short blocks while catching up, so an empty stream does not delay the start.
            let block = if caught_up.is_some() { Duration::from_millis(1) } else { Duration::from_secs(1) };
            let read = tokio::select! {
                r = streams::read_after(&mut con, &stream, &last, 100, block) => r,
                _ = stop.cancelled() => return,
            };
            match read {
                Ok(entries) => {
                    backoff.reset();
                    if entries.is_empty()
                        && let Some(done) = caught_up.take()
                    {
                        let _ = done.send(());
                    }
                    for e in entries {
                        let dispatch_id = e.fields.as_ref().and_then(|f| {
                            f.iter().find(|(k, _)| k == b"dispatch_id").map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                        });
                        if let Some(d) = dispatch_id {
                            cancels.note(d);
                        }
                        last = e.id;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "agent cannot read cancel notices; reconnecting");
                    backoff.wait(&stop).await;
                    break;
                }
            }
        }
    }
}
