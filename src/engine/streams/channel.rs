//! The one pub/sub listener: a replica's subscription to a channel (the routing file's reload,
//! operators' wake-ups), made again after every loss, with the one backoff.

use std::future::Future;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Endpoint;
use crate::engine::backoff::Backoff;

/// What a listener is told.
pub(crate) enum Heard {
    /// Subscribed, first or again: pub/sub drops what is sent while nobody listens, so what a
    /// message would have caused may be due now.
    Subscribed,
    Message(Vec<u8>),
}

/// Listens on `channel` of the master `endpoint` names until `token`, calling `handle` after
/// each (re)subscription and with each message. `who` names the listener in its warnings.
pub(crate) async fn listen<F, Fut>(endpoint: &Endpoint, channel: &str, who: &str, token: &CancellationToken, mut handle: F)
where
    F: FnMut(Heard) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut backoff = Backoff::default();
    while !token.is_cancelled() {
        let pubsub = match endpoint.client().await {
            Ok(client) => client.get_async_pubsub().await,
            Err(e) => Err(e),
        };
        let mut pubsub = match pubsub {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "{who} cannot connect to Redis; retrying");
                backoff.wait(token).await;
                continue;
            }
        };
        if let Err(e) = pubsub.subscribe(channel).await {
            tracing::warn!(error = %e, "{who} cannot subscribe; retrying");
            backoff.wait(token).await;
            continue;
        }
        backoff.reset();
        handle(Heard::Subscribed).await;
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                msg = messages.next() => match msg {
                    Some(m) => handle(Heard::Message(m.get_payload_bytes().to_vec())).await,
                    None => {
                        tracing::warn!("{who} lost its subscription; resubscribing");
                        break;
                    }
                },
                _ = token.cancelled() => return,
            }
        }
    }
}
