//! Publishing: triggers, each at most once per dispatch_id, and the reload notice.

use std::time::Duration;

use redis::{RedisResult, Value};

/// XADD to a trigger stream only if this dispatch_id was never published: the key set with NX
/// and the XADD happen in one atomic script, so a replica that resumes after a pause, or a
/// republish after a crash, cannot produce a second trigger with the same dispatch_id.
const PUBLISH_ONCE: &str = r#"
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
return false
"#;

/// One trigger ready to publish.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub stream: String,
    pub dispatch_key: String,
    pub fields: Vec<(String, String)>,
}

/// Publishes triggers in one pipeline. Returns how many were new (the rest had been
/// published before and were skipped).
pub(crate) async fn publish_triggers<C: redis::aio::ConnectionLike>(
    con: &mut C,
    triggers: &[Trigger],
    key_ttl: Duration,
) -> RedisResult<usize> {
    if triggers.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    for t in triggers {
        let cmd = pipe.cmd("EVAL").arg(PUBLISH_ONCE).arg(2).arg(&t.stream).arg(&t.dispatch_key).arg(key_ttl.as_secs().max(1));
        for (k, v) in &t.fields {
            cmd.arg(k).arg(v);
        }
    }
    let replies: Vec<Value> = pipe.query_async(con).await?;
    Ok(replies.iter().filter(|v| !matches!(v, Value::Nil)).count())
}

/// Asks every replica to re-read its routing file; returns how many replicas listened.
pub(crate) async fn request_reload<C: redis::aio::ConnectionLike>(con: &mut C, channel: &str) -> RedisResult<u64> {
    redis::cmd("PUBLISH").arg(channel).arg("reload").query_async(con).await
}
