//! Publishing: triggers, each at most once per dispatch_id, and the reload notice.

use std::time::Duration;

use redis::{ErrorKind, RedisError, RedisResult, Value};

/// XADD to a trigger stream only if this dispatch_id was never published: the key set with NX
/// and the XADD happen in one atomic script, so a replica that resumes after a pause, or a
/// republish after a crash, cannot produce a second trigger with the same dispatch_id.
///
/// When the key exists, its TTL is set again: a write, so that a `WAIT` after a republication
/// covers this connection up to now, and with it the first publication, which came earlier in
/// the same replication stream (a script that writes nothing moves no replication offset).
const PUBLISH_ONCE: &str = r#"
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
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
///
/// When the endpoint asks for it ([`super::Confirm`], a Sentinel URL by default), the
/// pipeline ends with `WAIT replicas timeout`, on a connection of its own (`WAIT` blocks its
/// connection), and fewer acknowledgements than asked is an error: the caller then does not
/// record the triggers as published, and they are published again later. An asynchronous
/// replica promoted by a failover may lack what its master acknowledged; a trigger recorded
/// as published but lost that way would strand its work package.
pub(crate) async fn publish_triggers(con: &mut super::MasterConnection, triggers: &[Trigger], key_ttl: Duration) -> RedisResult<usize> {
    if triggers.is_empty() {
        return Ok(0);
    }
    let confirm = con.endpoint().confirm();
    let mut pipe = redis::pipe();
    for t in triggers {
        let cmd = pipe.cmd("EVAL").arg(PUBLISH_ONCE).arg(2).arg(&t.stream).arg(&t.dispatch_key).arg(key_ttl.as_secs().max(1));
        for (k, v) in &t.fields {
            cmd.arg(k).arg(v);
        }
    }
    if confirm.replicas == 0 {
        let replies: Vec<Value> = pipe.query_async(con).await?;
        return Ok(replies.iter().filter(|v| !matches!(v, Value::Nil)).count());
    }
    pipe.cmd("WAIT").arg(confirm.replicas).arg(confirm.timeout.as_millis().max(1) as u64);
    let mut replies: Vec<Value> = pipe.query_async(&mut con.fenced()).await?;
    let acked = match replies.pop() {
        Some(Value::Int(n)) => n,
        _ => -1,
    };
    if acked < i64::from(confirm.replicas) {
        return Err(RedisError::from((
            ErrorKind::Client,
            "triggers not confirmed by enough Redis replicas",
            format!("{acked} of {} within {:?}; they are published again later", confirm.replicas, confirm.timeout),
        )));
    }
    Ok(replies.iter().filter(|v| !matches!(v, Value::Nil)).count())
}

/// Asks every replica to re-read its routing file; returns how many replicas listened.
pub(crate) async fn request_reload<C: redis::aio::ConnectionLike>(con: &mut C, channel: &str) -> RedisResult<u64> {
    redis::cmd("PUBLISH").arg(channel).arg("reload").query_async(con).await
}
