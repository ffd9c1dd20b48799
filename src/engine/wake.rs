//! wake: dispatch rounds asked for by operators' actions (contract v1.6). An action (the CLI's,
//! in a process of its own without a dispatch loop, or the admin API's on any replica)
//! publishes on `ge:ops:wake` what it may have made possible; every replica runs a round for
//! it at once instead of at its next sweep. Pub/sub drops what is sent while a replica is not
//! subscribed; that replica's sweep finds the same work a scheduler interval later.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::engine::context::Ctx;
use crate::engine::dispatch::{self, Ready, Scope};
use crate::engine::streams::{self, Heard};

/// More work packages than this in one message are sent as a sweep instead.
const MAX_IDS: usize = 1000;

/// The message for a round over `wp_ids` and every agent's ready work (None: a sweep from
/// the start of the incoming order).
pub(crate) fn message(wp_ids: Option<&[String]>) -> String {
    match wp_ids {
        Some(ids) if ids.len() <= MAX_IDS => serde_json::json!({ "wp_ids": ids }).to_string(),
        _ => "sweep".into(),
    }
}

/// The round a message asks for; an unreadable message is taken as a sweep.
fn scope_of(message: &[u8]) -> Scope {
    #[derive(serde::Deserialize)]
    struct Ids {
        wp_ids: Vec<String>,
    }
    match serde_json::from_slice::<Ids>(message) {
        Ok(Ids { wp_ids }) => Scope { wp_ids, sweep_from: None, ready: Ready::All },
        Err(_) => Scope::sweep(dispatch::SWEEP_START),
    }
}

/// Runs the round a wake-up asks for on this replica.
pub(crate) async fn round(ctx: &Ctx, wp_ids: Option<&[String]>) {
    let scope = scope_of(message(wp_ids).as_bytes());
    if let Err(e) = dispatch::round(ctx, &scope).await {
        tracing::warn!(error = format!("{e:#}"), "dispatch after an operator action failed; the scheduler will retry");
        ctx.stats.note_error();
    }
}

pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    streams::listen(&ctx.endpoint, &ctx.settings.names.wake_channel, "wake listener", &token, |heard| {
        let ctx = &ctx;
        async move {
            // A (re)subscription asks for nothing: the sweep finds what a lost message asked for.
            let Heard::Message(m) = heard else { return };
            if let Err(e) = dispatch::round(ctx, &scope_of(&m)).await {
                tracing::warn!(error = format!("{e:#}"), "dispatch on an operator's wake-up failed; the scheduler will retry");
                ctx.stats.note_error();
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_names_the_work_or_asks_for_a_sweep() {
        let ids = vec!["a".to_string(), "b".to_string()];
        let s = scope_of(message(Some(&ids)).as_bytes());
        assert_eq!((s.wp_ids, s.sweep_from, s.ready), (ids, None, Ready::All));
        assert!(scope_of(message(None).as_bytes()).sweep_from.is_some());
        let many: Vec<String> = (0..=MAX_IDS).map(|i| i.to_string()).collect();
        assert!(scope_of(message(Some(&many)).as_bytes()).sweep_from.is_some());
        assert!(scope_of(b"garbage").sweep_from.is_some());
    }
}
