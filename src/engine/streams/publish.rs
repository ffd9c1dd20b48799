//! Publishing: triggers, each at most once per dispatch_id, and the reload notice.

use std::time::Duration;

use redis::{RedisResult, Value};

/// XADD to a trigger stream only if this dispatch_id was never published: the check, the XADD
/// and the key happen in one atomic script, so a replica that resumes after a pause, or a
/// republish after a crash, cannot produce a second trigger with the same dispatch_id. The key
/// is set only after the XADD succeeded: a trigger Redis refuses (a key of the wrong type
/// under the stream's name) leaves no key behind that would pass for a publication.
///
/// When the key exists, its TTL is set again: a write, so that a `WAIT` after a republication
/// covers this connection up to now, and with it the first publication, which came earlier in
/// the same replication stream (a script that writes nothing moves no replication offset).
const PUBLISH_ONCE: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  return false
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return id
"#;

/// The most fields settings may let an incoming entry have (`GE_MAX_FIELDS`): the script above
/// passes a trigger's fields to XADD through Lua's `unpack`, which gives at most 7,999 values
/// (LUAI_MAXCSTACK 8,000) besides the TTL, and a trigger adds the orchestrator's own six
/// fields to the entry's. Beyond it, every such trigger would be refused.
pub(crate) const MAX_ENTRY_FIELDS: usize = 3_990;

/// One trigger ready to publish.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub stream: String,
    pub dispatch_key: String,
    pub fields: Vec<(String, String)>,
}

/// What became of one trigger.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Published {
    /// Added now.
    New,
    /// Published before; not added again.
    Already,
    /// Redis refused it (its message): nothing was recorded, so it is published again later.
    Refused(String),
}

/// Publishes triggers in one pipeline, and says what became of each, in order. A trigger
/// Redis refuses does not stop the others.
///
/// When the endpoint asks for it ([`super::Confirm`], a Sentinel URL by default), the
/// pipeline ends with `WAIT replicas timeout`, on a connection of its own (`WAIT` blocks its
/// connection), and fewer acknowledgements than asked is an error: the caller then does not
/// record the triggers as published, and they are published again later. An asynchronous
/// replica promoted by a failover may lack what its master acknowledged; a trigger recorded
/// as published but lost that way would strand its work package.
pub(crate) async fn publish_triggers(
    con: &mut super::MasterConnection,
    triggers: &[Trigger],
    key_ttl: Duration,
) -> RedisResult<Vec<Published>> {
    if triggers.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for t in triggers {
        let cmd = pipe.cmd("EVAL").arg(PUBLISH_ONCE).arg(2).arg(&t.stream).arg(&t.dispatch_key).arg(key_ttl.as_secs().max(1));
        for (k, v) in &t.fields {
            cmd.arg(k).arg(v);
        }
    }
    let replies = super::endpoint::query_confirmed(con, pipe, "triggers").await?;
    Ok(replies
        .into_iter()
        .map(|v| match v {
            Value::Nil => Published::Already,
            Value::ServerError(e) => Published::Refused(e.to_string()),
            _ => Published::New,
        })
        .collect())
}

/// Asks every replica to re-read its routing file; returns how many replicas listened.
pub(crate) async fn request_reload<C: redis::aio::ConnectionLike>(con: &mut C, channel: &str) -> RedisResult<u64> {
    redis::cmd("PUBLISH").arg(channel).arg("reload").query_async(con).await
}
