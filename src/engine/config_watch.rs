//! config_watcher: re-reads the routing file on every `ge:config:reload` message, and on
//! every (re)subscription, since pub/sub drops messages sent while disconnected.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::core::routing_file;
use crate::engine::context::{Ctx, Stats};
use crate::engine::streams;

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
    // Every message, and every (re)subscription, since one may have been missed.
    streams::listen(&ctx.endpoint, &ctx.settings.names.reload_channel, "config watcher", &token, |_| async {
        reload(&ctx);
    })
    .await;
}
