//! The one door for operators' actions (contract v1.6): retry, cancel (of one work package or
//! of a plan, running work included), skip, pause, resume, rerun, approve, reject and events. The CLI and the admin API
//! call these functions and nothing else to change work; each does its SQL through the module
//! that owns the tables (`store`, `controls`), tells the agents of running work it cancelled
//! (`cancels.{agent}`), and then wakes dispatch the same way whoever called it: a message on
//! `ge:ops:wake`, on which every replica runs a round at once (`engine::wake`). The admin API
//! also runs that round on its own replica before it answers, so its answer follows the
//! dispatch it caused.

use sqlx::PgPool;

use crate::engine::context::Ctx;
use crate::engine::controls::{self, Pause, PauseScope};
use crate::engine::kept_events::Delivered;
use crate::engine::settings::Names;
use crate::engine::store::{self, Cancelled, RerunRefused, Roots};
use crate::engine::waits::{self, Verdict, WaitError};
use crate::engine::{streams, wake};

/// Why an action did nothing, or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    /// The thing named does not exist (or not in a state the action applies to): 404.
    #[error("{0}")]
    NotFound(String),
    /// It exists but the action does not apply to it now: 409.
    #[error("{0}")]
    Conflict(String),
    /// What was asked is malformed: 400.
    #[error("{0}")]
    Invalid(String),
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What an action needs: the database, Redis, the names of keys, and (on a replica) the
/// replica itself, whose dispatch round runs before the action returns.
pub(crate) struct Door<'a> {
    pub pool: &'a PgPool,
    pub redis: streams::MasterConnection,
    pub names: &'a Names,
    pub replica: Option<&'a Ctx>,
}

impl<'a> Door<'a> {
    /// The door of the admin API of `ctx`'s replica.
    pub(crate) fn of(ctx: &'a Ctx) -> Self {
        Door { pool: &ctx.pool, redis: ctx.redis.clone(), names: &ctx.settings.names, replica: Some(ctx) }
    }

    /// Asks for a dispatch round over `wp_ids` and every agent's ready work (None: a sweep).
    /// Returns how many replicas listened. A failed publication is only logged: what it would
    /// have sped up, the replicas' next sweep does.
    async fn wake(&mut self, wp_ids: Option<&[String]>) -> u64 {
        if let Some(ctx) = self.replica {
            wake::round(ctx, wp_ids).await;
        }
        match streams::request_wake(&mut self.redis, &self.names.wake_channel, &wake::message(wp_ids)).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot wake the replicas; their next sweep dispatches instead");
                0
            }
        }
    }

    /// Tells each agent running one of the cancelled dispatches to stop it.
    async fn tell_agents(&mut self, cancelled: &[Cancelled]) -> Result<usize, OpError> {
        let notices: Vec<(String, Vec<(&str, String)>)> = cancelled
            .iter()
            .filter_map(|c| {
                let (agent, dispatch_id) = c.running.as_ref()?;
                let fields =
                    vec![("wp_id", c.wp_id.clone()), ("dispatch_id", dispatch_id.clone()), ("reason", "cancelled by an operator".into())];
                Some((self.names.cancel_stream(agent), fields))
            })
            .collect();
        streams::publish_cancels(&mut self.redis, &notices).await?;
        Ok(notices.len())
    }
}

/// Retry of a `failed` or `cancelled` work package: a fresh attempt budget.
pub(crate) async fn retry(door: &mut Door<'_>, wp_id: &str) -> Result<(), OpError> {
    if !store::retry(door.pool, wp_id).await? {
        return Err(OpError::Conflict(format!("{wp_id} is not failed or cancelled (or does not exist); nothing to retry")));
    }
    tracing::info!(wp_id = %wp_id, "retried by an operator");
    door.wake(Some(&[wp_id.to_string()])).await;
    Ok(())
}

/// What a cancel did.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct CancelOutcome {
    /// Every work package cancelled, the dependents included.
    pub cancelled: Vec<String>,
    /// Those that were running: their agents were told to stop.
    pub running: Vec<String>,
    /// Why their agents could not be told (Redis did not take the notices). The cancel
    /// stands; the agents' reports will be ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_told: Option<String>,
}

/// Cancels one work package, or every open one of a plan, running ones included, and what
/// depends on them; tells the agents of the running ones; wakes dispatch for the slots and
/// lanes that frees.
pub(crate) async fn cancel(door: &mut Door<'_>, roots: Roots<'_>) -> Result<CancelOutcome, OpError> {
    let (cancelled, unblocked) = store::cancel_many(door.pool, roots).await?;
    if cancelled.is_empty() {
        return Err(match roots {
            Roots::One(w) => OpError::Conflict(format!("{w} is already completed or cancelled (or does not exist); nothing to cancel")),
            Roots::Plan(p) => OpError::Conflict(format!("plan {p} has no open, failed or running work; nothing to cancel")),
        });
    }
    let running: Vec<String> = cancelled.iter().filter(|c| c.running.is_some()).map(|c| c.wp_id.clone()).collect();
    tracing::info!(?roots, cascade = cancelled.len(), running = running.len(), "cancelled by an operator");
    // Told before the wake: the freed slot may go to the agent's next work at once.
    let not_told = match door.tell_agents(&cancelled).await {
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cancelled, but the agents of running work could not be told");
            Some(format!("the agents of {} could not be told ({e}); their reports will be ignored", running.join(", ")))
        }
    };
    door.wake(Some(&unblocked)).await;
    Ok(CancelOutcome { cancelled: cancelled.into_iter().map(|c| c.wp_id).collect(), running, not_told })
}

/// Skip: the work package counts as completed without running. Returns what it may unblock.
pub(crate) async fn skip(door: &mut Door<'_>, wp_id: &str) -> Result<Vec<String>, OpError> {
    let Some(unblocked) = store::skip(door.pool, wp_id).await? else {
        return Err(OpError::Conflict(format!("{wp_id} is already completed (or does not exist); nothing to skip")));
    };
    tracing::info!(wp_id = %wp_id, "skipped by an operator");
    door.wake(Some(&unblocked)).await;
    Ok(unblocked)
}

/// Pauses an agent, a lane or a plan; what is paused already keeps its first pause. Nothing to
/// wake and no agent to tell (a pause only holds work back), so it needs PostgreSQL alone.
pub(crate) async fn pause(pool: &PgPool, scope: PauseScope, name: &str, reason: Option<&str>) -> Result<Pause, OpError> {
    let p = controls::pause(pool, scope, name, reason).await?;
    tracing::info!(scope = scope.as_str(), name = %name, "paused by an operator");
    Ok(p)
}

/// Ends a pause and wakes dispatch for the work it held.
pub(crate) async fn resume(door: &mut Door<'_>, scope: PauseScope, name: &str) -> Result<Pause, OpError> {
    let Some(p) = controls::resume(door.pool, scope, name).await? else {
        return Err(OpError::NotFound(format!("{} {} is not paused", scope.as_str(), crate::core::entry::excerpt(name))));
    };
    tracing::info!(scope = scope.as_str(), name = %name, "resumed by an operator");
    door.wake(None).await;
    Ok(p)
}

/// Runs finished work again as a new attempt, with its dependents when `downstream`; returns
/// the work packages reopened.
pub(crate) async fn rerun(door: &mut Door<'_>, wp_id: &str, downstream: bool) -> Result<Vec<String>, OpError> {
    let reopened = store::rerun(door.pool, wp_id, downstream).await.map_err(|e| match e {
        RerunRefused::NotFound(_) => OpError::NotFound(e.to_string()),
        RerunRefused::Conflict(why) => OpError::Conflict(why),
        RerunRefused::Db(e) => OpError::Db(e),
    })?;
    tracing::info!(wp_id = %wp_id, downstream, reopened = reopened.len(), "rerun by an operator");
    door.wake(Some(&reopened)).await;
    Ok(reopened)
}

impl From<WaitError> for OpError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::NotFound(_) => OpError::NotFound(e.to_string()),
            WaitError::NotWaiting { .. } => OpError::Conflict(e.to_string()),
            WaitError::Invalid(why) => OpError::Invalid(why),
            WaitError::Db(e) => OpError::Db(e),
        }
    }
}

/// (v1.6) Approves or rejects a work package waiting for an approval (`who` and `comment` go
/// into its result and history); returns what its approval may unblock.
pub(crate) async fn decide(
    door: &mut Door<'_>,
    wp_id: &str,
    who: &str,
    comment: Option<&str>,
    verdict: Verdict,
) -> Result<Vec<String>, OpError> {
    let unblocked = match verdict {
        Verdict::Approve => waits::approve(door.pool, wp_id, who, comment).await?,
        Verdict::Reject => waits::reject(door.pool, wp_id, who, comment).await?,
    };
    let how = if verdict == Verdict::Approve { "approved" } else { "rejected" };
    tracing::info!(wp_id = %wp_id, by = %who, "{how} by an operator");
    if let Some(ctx) = door.replica {
        waits::note(ctx, how, 1);
    }
    door.wake(Some(&unblocked)).await;
    Ok(unblocked)
}

/// (v1.6) An event: completes every work package waiting for `key`, with `fields` as their
/// result, or is kept for the first to come.
pub(crate) async fn event(door: &mut Door<'_>, key: &str, fields: &serde_json::Value) -> Result<Delivered, OpError> {
    let d = waits::deliver(door.pool, key, fields, None).await?;
    if let Some(ctx) = door.replica {
        waits::note(ctx, "event", d.completed.len());
        if d.kept {
            waits::bound_kept(ctx).await?;
        }
    }
    door.wake(Some(&d.unblocked)).await;
    Ok(d)
}
