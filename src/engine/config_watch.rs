//! config_watcher: re-reads the routing file on every `ge:config:reload` message, and on
//! every (re)subscription, since pub/sub drops messages sent while disconnected.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::core::routing_file;
use crate::engine::backoff::Backoff;
use crate::engine::context::{Ctx, Stats};

/// Loads and validates the file, then swaps it in whole. An invalid file is refused and the
/// routing in force stays. Returns whether the new file was taken.
pub fn reload(ctx: &Ctx) -> bool {
    match routing_file::load(&ctx.settings.config) {
        Ok(table) => {
            let old = ctx.routing.get().config_version.clone();
            if table.config_version != old {
                tracing::info!(from = %old, to = %table.config_version, "routing reloaded");
            }
            ctx.routing.set(table);
            true
        }
        Err(e) => {
            Stats::add(&ctx.stats.reload_failures, 1);
            tracing::error!(error = %e, "routing reload refused; the routing in force stays");
            false
        }
    }
}

pub async fn run(ctx: Arc<Ctx>, token: CancellationToken) {
    let mut backoff = Backoff::default();
    while !token.is_cancelled() {
        let pubsub = match ctx.endpoint.client().await {
            Ok(client) => client.get_async_pubsub().await,
            Err(e) => Err(e),
        };
        let mut pubsub = match pubsub {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "config watcher cannot connect to Redis; retrying");
                backoff.wait(&token).await;
                continue;
            }
        };
        if let Err(e) = pubsub.subscribe(&ctx.settings.names.reload_channel).await {
            tracing::warn!(error = %e, "config watcher cannot subscribe; retrying");
            backoff.wait(&token).await;
            continue;
        }
        backoff.reset();
        reload(&ctx);
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                msg = messages.next() => match msg {
                    Some(_) => { reload(&ctx); }
                    None => {
                        tracing::warn!("config watcher lost its subscription; resubscribing");
                        break;
                    }
                },
                _ = token.cancelled() => return,
            }
        }
    }
}
