//! Acknowledging entries in one MULTI/EXEC with what must not exist without the
//! acknowledgement: a replica's dead letters, an agent's reports. And the dead-letter format
//! both ways: written here, sent back to its input stream by `requeue_deadletter`.

use redis::{RedisResult, ToRedisArgs, Value};

use super::entries::xadd_cmd;
use crate::core::entry::RawFields;
use crate::engine::settings::Names;

/// An entry that could not be processed, with where it came from and why.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub reason: String,
    pub detail: String,
    pub stream: String,
    pub source_id: String,
    pub fields: RawFields,
}

/// The fields a dead letter adds to the original ones.
pub(crate) const DEADLETTER_META: [&str; 4] = ["reason", "detail", "stream", "source_id"];

impl DeadLetter {
    /// The dead-letter entry's fields: the metadata, then the original fields. An original
    /// field whose name collides with the metadata is kept as `original.NAME`.
    pub(crate) fn entry_fields(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"reason".to_vec(), self.reason.as_bytes().to_vec()),
            (b"detail".to_vec(), self.detail.as_bytes().to_vec()),
            (b"stream".to_vec(), self.stream.as_bytes().to_vec()),
            (b"source_id".to_vec(), self.source_id.as_bytes().to_vec()),
        ];
        for (k, v) in &self.fields {
            if DEADLETTER_META.iter().any(|m| m.as_bytes() == k.as_slice()) {
                let mut name = b"original.".to_vec();
                name.extend_from_slice(k);
                out.push((name, v.clone()));
            } else {
                out.push((k.clone(), v.clone()));
            }
        }
        out
    }
}

/// Appends each of `entries` to `target` and acknowledges `ids`, as one MULTI/EXEC.
fn append_and_ack<F, K, V, I>(target: &str, maxlen: Option<u64>, entries: &[F], stream: &str, group: &str, ids: &[I]) -> redis::Pipeline
where
    F: AsRef<[(K, V)]>,
    K: ToRedisArgs,
    V: ToRedisArgs,
    I: ToRedisArgs,
{
    let mut pipe = redis::pipe();
    pipe.atomic();
    for fields in entries {
        pipe.add_command(xadd_cmd(target, maxlen, fields.as_ref())).ignore();
    }
    if !ids.is_empty() {
        pipe.cmd("XACK").arg(stream).arg(group).arg(ids).ignore();
    }
    pipe
}

/// Writes the dead letters and acknowledges `ack_ids` in one MULTI/EXEC, so an entry is never
/// acknowledged without its dead letter. A replica that resumes after a pause with a batch a
/// survivor has already handled writes a second copy (same `source_id`); writing a dead
/// letter only when its own XACK found the entry pending lost 2 of 914 in a chaos run with
/// paused replicas, so a rare duplicate is the price of never losing one.
pub(crate) async fn ack_with_deadletters<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    group: &str,
    ack_ids: &[String],
    deadletters: &[DeadLetter],
    deadletter_stream: &str,
    deadletter_maxlen: u64,
) -> RedisResult<()> {
    if ack_ids.is_empty() && deadletters.is_empty() {
        return Ok(());
    }
    let entries: Vec<_> = deadletters.iter().map(DeadLetter::entry_fields).collect();
    append_and_ack(deadletter_stream, Some(deadletter_maxlen), &entries, stream, group, ack_ids).query_async(con).await
}

/// An agent's reports (to the completed or the failed stream) with the acknowledgement of the
/// triggers they answer, in one MULTI/EXEC: an agent that crashes has either reported and
/// acknowledged or done neither, so it neither loses a report nor reports twice.
pub(crate) async fn report_and_ack<C, F, K, V, I>(
    con: &mut C,
    target: &str,
    reports: &[F],
    stream: &str,
    group: &str,
    ids: &[I],
) -> RedisResult<()>
where
    C: redis::aio::ConnectionLike,
    F: AsRef<[(K, V)]>,
    K: ToRedisArgs,
    V: ToRedisArgs,
    I: ToRedisArgs,
{
    append_and_ack(target, None, reports, stream, group, ids).query_async(con).await
}

/// `entry_fields` read backwards, in one script so that reading, sending and deleting are
/// one step.
const REQUEUE: &str = r#"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local f = e[1][2]
local meta = { reason = true, detail = true, stream = true, source_id = true }
local out, target = {}, KEYS[2]
for i = 1, #f, 2 do
  local k, v = f[i], f[i + 1]
  if k == 'stream' and (v == KEYS[3] or v == KEYS[4]) then target = v end
  if not meta[k] then
    if string.sub(k, 1, 9) == 'original.' and meta[string.sub(k, 10)] then k = string.sub(k, 10) end
    table.insert(out, k)
    table.insert(out, v)
  end
end
if #out == 0 then return 0 end
local id = redis.call('XADD', target, '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return {target, id}
"#;

/// What became of one dead letter sent back.
pub(crate) enum Requeued {
    Sent {
        stream: String,
        new_id: String,
    },
    /// It had no original fields (e.g. `deleted`): nothing to send.
    Empty,
    NotFound,
}

/// Moves one dead letter back to the input stream it came from (the incoming stream when it
/// names no input stream), with the dead-letter metadata stripped and `original.NAME`
/// restored, and deletes it from the dead-letter stream, atomically: two operators pressing
/// requeue at once requeue it once.
pub(crate) async fn requeue_deadletter<C: redis::aio::ConnectionLike>(con: &mut C, names: &Names, id: &str) -> RedisResult<Requeued> {
    let v: Value = redis::Script::new(REQUEUE)
        .key(&names.deadletter)
        .key(&names.incoming)
        .key(&names.completed)
        .key(&names.failed)
        .arg(id)
        .invoke_async(con)
        .await?;
    Ok(match v {
        Value::Int(0) => Requeued::Empty,
        Value::Array(parts) if parts.len() == 2 => {
            let s = |v: &Value| redis::from_redis_value_ref::<String>(v).unwrap_or_default();
            Requeued::Sent { stream: s(&parts[0]), new_id: s(&parts[1]) }
        }
        _ => Requeued::NotFound,
    })
}
