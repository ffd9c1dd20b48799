//! Stream trimming (contract v1.3): the input streams (`incoming`, `completed`, `failed`,
//! `heartbeat`) lose what every consumer group has acknowledged; each agent's trigger stream
//! loses the same, and on top of that unread triggers past the agent's policy (age, length).
//! The measure and the cut are one script (`streams::trim_stream`); this module decides which
//! streams, under which policy, and warns when an agent falls behind towards its trim point.

use crate::core::entry::stream_id_parts;
use crate::core::retention::TriggerPolicy;
use crate::engine::context::Ctx;
use crate::engine::input::Input;
use crate::engine::streams::{self, TrimReport};

/// Trims of one stream a turn: each removes at most about 10,000 entries (XTRIM's default
/// LIMIT for `~`), so a long backlog is worked off over a few turns without one long call.
const MAX_TRIMS: usize = 20;
/// An agent whose oldest unread trigger has used this share of its policy is warned about.
pub(crate) const WARN_RATIO: f64 = 0.8;

/// A stream the orchestrator trims, and its policy for unread entries (none for the inputs:
/// an input entry is never removed before the group acknowledged it).
pub(crate) struct Target {
    pub stream: String,
    pub agent: Option<String>,
    pub policy: TriggerPolicy,
}

pub(crate) fn targets(ctx: &Ctx) -> Vec<Target> {
    let mut out: Vec<Target> =
        Input::ALL.iter().map(|i| Target { stream: i.stream(ctx).to_string(), agent: None, policy: TriggerPolicy::default() }).collect();
    for agent in ctx.routing.get().agents.keys() {
        out.push(Target {
            stream: ctx.settings.names.trigger_stream(agent),
            agent: Some(agent.clone()),
            policy: ctx.settings.retention.trigger_policy(agent),
        });
    }
    out
}

/// How close the oldest trigger an agent still needs is to being cut by its policy: 0 when
/// nothing is waiting, 1 at the trim point (and beyond, it is gone). The larger of the age
/// and the length ratios.
pub(crate) fn used_ratio(r: &TrimReport, policy: &TriggerPolicy) -> f64 {
    let mut ratio: f64 = 0.0;
    if let (Some(age), Some((ms, _))) = (policy.max_age.0, r.oldest_needed.as_deref().and_then(stream_id_parts)) {
        let waited = r.now_ms.saturating_sub(ms) as f64 / 1000.0;
        ratio = ratio.max(waited / age.as_secs_f64());
    }
    if let Some(len) = policy.max_len {
        ratio = ratio.max(r.backlog as f64 / len as f64);
    }
    ratio
}

/// Every target measured, nothing removed (for `/metrics`).
pub(crate) async fn measure(ctx: &Ctx) -> Vec<(Target, redis::RedisResult<TrimReport>)> {
    let mut redis = ctx.redis.clone();
    let mut out = Vec::new();
    for t in targets(ctx) {
        let r = streams::trim_stream(&mut redis, &t.stream, t.policy.max_age.0, t.policy.max_len, true).await;
        out.push((t, r));
    }
    out
}

/// One turn of trimming, when no other replica took it within the interval. Returns the
/// entries removed.
pub(crate) async fn trim_all(ctx: &Ctx) -> anyhow::Result<u64> {
    let mut redis = ctx.redis.clone();
    let turn = format!("{}retention", ctx.settings.lease_prefix);
    if !streams::take_turn(&mut redis, &turn, &ctx.consumer, ctx.settings.retention.retention_interval).await? {
        return Ok(0);
    }
    let mut total = 0;
    for t in targets(ctx) {
        let mut last = TrimReport::default();
        for _ in 0..MAX_TRIMS {
            last = streams::trim_stream(&mut redis, &t.stream, t.policy.max_age.0, t.policy.max_len, false).await?;
            ctx.metrics.trimmed(&t.stream, last.trimmed);
            total += last.trimmed;
            if last.trimmed == 0 {
                break;
            }
        }
        if let Some(agent) = &t.agent {
            let ratio = used_ratio(&last, &t.policy);
            if ratio >= WARN_RATIO {
                tracing::warn!(
                    agent_id = %agent,
                    stream = %t.stream,
                    backlog = last.backlog,
                    oldest_unread = last.oldest_needed.as_deref().unwrap_or(""),
                    policy = %t.policy,
                    "the agent lags close to its trigger trim point; triggers it has not read will be removed"
                );
            }
        }
    }
    Ok(total)
}
