//! Notices that are no work entries (contract v1.6): an operator's cancel told to the agent
//! that runs the dispatch (`cancels.{agent}`, a capped stream read without a group), and the
//! wake-up that asks every replica for a dispatch round after an operator's action (a pub/sub
//! channel: nothing is lost when no replica listens, since their sweep finds the same work).

use std::time::Duration;

use redis::{RedisResult, Value};

use super::{entries::xadd_cmd, parse_read_reply};
use crate::core::entry::StreamEntry;

/// About how many cancel notices an agent's stream keeps: an agent that comes back reads the
/// recent ones first, so it does not start a trigger cancelled while it was away.
const CANCEL_KEEP: u64 = 1000;

/// Appends one cancel notice per `(stream, fields)` in one pipeline; returns their ids.
pub(crate) async fn publish_cancels<C: redis::aio::ConnectionLike>(
    con: &mut C,
    notices: &[(String, Vec<(&str, String)>)],
) -> RedisResult<Vec<String>> {
    if notices.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for (stream, fields) in notices {
        pipe.add_command(xadd_cmd(stream, Some(CANCEL_KEEP), fields));
    }
    pipe.query_async(con).await
}

/// `XREAD COUNT n BLOCK ms STREAMS stream after`: the entries after `after`, waiting up to
/// `block` for one. Empty when none came.
pub(crate) async fn read_after<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    after: &str,
    count: usize,
    block: Duration,
) -> RedisResult<Vec<StreamEntry>> {
    let v: Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis().max(1) as u64)
        .arg("STREAMS")
        .arg(stream)
        .arg(after)
        .query_async(con)
        .await?;
    Ok(parse_read_reply(v))
}

/// Publishes a wake-up on `channel`; returns how many replicas listened.
pub(crate) async fn request_wake<C: redis::aio::ConnectionLike>(con: &mut C, channel: &str, message: &str) -> RedisResult<u64> {
    redis::cmd("PUBLISH").arg(channel).arg(message).query_async(con).await
}
