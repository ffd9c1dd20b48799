//! Acknowledging entries in one MULTI/EXEC with what must not exist without the
//! acknowledgement: a replica's dead letters, an agent's reports. And the dead-letter format
//! both ways: written here, sent back to its input stream by `requeue_deadletter`.

use redis::{RedisResult, ToRedisArgs, Value};

use super::entries::xadd_cmd;
use crate::core::entry::{MAX_FIELD_NAME_BYTES, RawFields, StreamEntry};
use crate::engine::settings::{Names, RunSettings};

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
const DEADLETTER_META: [&str; 4] = ["reason", "detail", "stream", "source_id"];

/// Prefix of the fields that record what a dead letter did not keep of the entry:
/// `cut.NAME.bytes` and `cut.NAME.sha256` for a value kept only in part, `cut.fields` for
/// the number of fields left out.
pub(crate) const CUT_PREFIX: &str = "cut.";

/// Whether a dead-letter field is the dead letter's own (metadata or a record of a cut)
/// rather than one of the original entry. An original field named like one is kept as
/// `original.NAME`.
pub(crate) fn is_deadletter_meta(name: &[u8]) -> bool {
    DEADLETTER_META.iter().any(|m| m.as_bytes() == name) || name.starts_with(CUT_PREFIX.as_bytes())
}

/// How much of an entry a dead letter keeps, and how long the dead-letter stream grows. An
/// oversized entry is what gets dead-lettered, so without them a producer's mistake is
/// copied whole into Redis and into every answer of the admin API.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeadLetterBounds {
    /// `MAXLEN ~` of the dead-letter stream.
    pub maxlen: u64,
    /// Bytes kept of each original value.
    pub value_bytes: usize,
    /// Original fields kept, the first ones.
    pub max_fields: usize,
}

impl DeadLetterBounds {
    pub(crate) fn of(settings: &RunSettings) -> Self {
        DeadLetterBounds {
            maxlen: settings.deadletter_maxlen,
            value_bytes: settings.deadletter_value_bytes,
            max_fields: settings.limits.max_fields,
        }
    }
}

/// The longest start of `v` of at most `max` bytes that does not split a UTF-8 character
/// (values are text but for hostile entries; bytes that are not text are cut anywhere).
fn cut_len(v: &[u8], max: usize) -> usize {
    let mut n = max.min(v.len());
    for _ in 0..3 {
        if n == 0 || n == v.len() || v[n] & 0b1100_0000 != 0b1000_0000 {
            break;
        }
        n -= 1;
    }
    n
}

/// SHA-256 in hex: what a resubmitted value can be checked against once the value is gone.
fn sha256_hex(v: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, v).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl DeadLetter {
    /// The dead letter of `entry`, read from `stream`, with its original fields.
    pub(crate) fn of(stream: &str, entry: &StreamEntry, reason: &str, detail: impl Into<String>) -> DeadLetter {
        DeadLetter {
            reason: reason.to_string(),
            detail: detail.into(),
            stream: stream.to_string(),
            source_id: entry.id.clone(),
            fields: entry.fields.clone().unwrap_or_default(),
        }
    }

    /// The dead-letter entry's fields: the metadata, then the original fields within
    /// `bounds`, then what was cut. An original field whose name collides with the metadata
    /// or the record of cuts is kept as `original.NAME`; one whose name is longer than any
    /// field may be is left out.
    pub(crate) fn entry_fields(&self, bounds: &DeadLetterBounds) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"reason".to_vec(), self.reason.as_bytes().to_vec()),
            (b"detail".to_vec(), self.detail.as_bytes().to_vec()),
            (b"stream".to_vec(), self.stream.as_bytes().to_vec()),
            (b"source_id".to_vec(), self.source_id.as_bytes().to_vec()),
        ];
        let mut cuts = Vec::new();
        let mut left_out = 0usize;
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i >= bounds.max_fields || k.len() > MAX_FIELD_NAME_BYTES {
                left_out += 1;
                continue;
            }
            let name = if is_deadletter_meta(k) { [b"original.".as_slice(), k].concat() } else { k.clone() };
            let kept = cut_len(v, bounds.value_bytes);
            if kept < v.len() {
                cuts.push((k, v.len(), sha256_hex(v)));
            }
            out.push((name, v[..kept].to_vec()));
        }
        for (k, len, hash) in cuts {
            let field = |suffix: &str| [CUT_PREFIX.as_bytes(), k, suffix.as_bytes()].concat();
            out.push((field(".bytes"), len.to_string().into_bytes()));
            out.push((field(".sha256"), hash.into_bytes()));
        }
        if left_out > 0 {
            out.push((format!("{CUT_PREFIX}fields").into_bytes(), left_out.to_string().into_bytes()));
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
    bounds: DeadLetterBounds,
) -> RedisResult<()> {
    if ack_ids.is_empty() && deadletters.is_empty() {
        return Ok(());
    }
    let entries: Vec<_> = deadletters.iter().map(|d| d.entry_fields(&bounds)).collect();
    append_and_ack(deadletter_stream, Some(bounds.maxlen), &entries, stream, group, ack_ids).query_async(con).await
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
/// one step. A dead letter that records a cut (`cut.*`) is left alone (-1): it no longer
/// holds the entry it would send.
const REQUEUE: &str = r#"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local f = e[1][2]
local meta = { reason = true, detail = true, stream = true, source_id = true }
local function is_meta(k) return meta[k] or string.sub(k, 1, 4) == 'cut.' end
local out, target = {}, KEYS[2]
for i = 1, #f, 2 do
  if string.sub(f[i], 1, 4) == 'cut.' then return -1 end
end
for i = 1, #f, 2 do
  local k, v = f[i], f[i + 1]
  if k == 'stream' and (v == KEYS[3] or v == KEYS[4]) then target = v end
  if not meta[k] then
    if string.sub(k, 1, 9) == 'original.' and is_meta(string.sub(k, 10)) then k = string.sub(k, 10) end
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
    /// Values or fields were cut when it was written: what it holds is not the entry.
    Cut,
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
        Value::Int(-1) => Requeued::Cut,
        Value::Array(parts) if parts.len() == 2 => {
            let s = |v: &Value| redis::from_redis_value_ref::<String>(v).unwrap_or_default();
            Requeued::Sent { stream: s(&parts[0]), new_id: s(&parts[1]) }
        }
        _ => Requeued::NotFound,
    })
}

#[cfg(test)]
mod tests {
    use super::cut_len;

    #[test]
    fn a_cut_never_splits_a_character_and_bytes_are_cut_anywhere() {
        let text = "aé€".as_bytes(); // 1 + 2 + 3 bytes
        assert_eq!((0..=7).map(|max| cut_len(text, max)).collect::<Vec<_>>(), [0, 1, 1, 3, 3, 3, 6, 6]);
        assert_eq!(cut_len(&[0x80, 0x80, 0x80, 0x80, 0x80], 4), 1, "at most three steps back, then anywhere");
        assert_eq!(cut_len(b"abc", 10), 3);
    }
}
