//! Redis Streams at the edge: connections, group reads, acknowledgements, dead letters and
//! the idempotent trigger publication. Everything that knows the shape of a Redis reply
//! lives here; `Reader` is the one loop that reads a consumer group.

mod reader;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisResult, Value};

use crate::core::entry::{RawFields, StreamEntry};
pub(crate) use reader::{Reader, Trouble};

/// The Redis client for `url`. A `rediss://` URL is verified against the system roots plus,
/// when `GE_REDIS_CA_CERT` names a PEM file, that CA. Errors never repeat the password.
pub fn client(url: &str) -> anyhow::Result<Client> {
    use anyhow::Context;
    let shown = crate::core::redact::url(url);
    match std::env::var_os("GE_REDIS_CA_CERT") {
        Some(ca) if url.starts_with("rediss://") => {
            let root = std::fs::read(&ca).with_context(|| format!("reading GE_REDIS_CA_CERT {}", ca.to_string_lossy()))?;
            let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(root) };
            Client::build_with_tls(url, certs).map_err(|e| anyhow::anyhow!("invalid REDIS_URL {shown}: {:?}", e.kind()))
        }
        _ => Client::open(url).map_err(|e| anyhow::anyhow!("invalid REDIS_URL {shown}: {:?}", e.kind())),
    }
}

/// Connection for short commands; reconnects on its own after Redis restarts.
pub async fn manager(client: &Client) -> RedisResult<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2);
    client.get_connection_manager_with_config(cfg).await
}

/// Connection for one blocking reader. It has no response timeout: the default 500 ms would
/// fail every `XREADGROUP ... BLOCK` longer than that and leave the connection wedged.
pub async fn blocking(client: &Client) -> RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new().set_connection_timeout(Some(Duration::from_secs(5))).set_response_timeout(None);
    client.get_multiplexed_async_connection_with_config(&cfg).await
}

/// Creates the group (and the stream) if needed. Starting at `0` means entries written before
/// the first replica ever started are still delivered.
pub async fn ensure_group<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str, group: &str) -> RedisResult<()> {
    let res: RedisResult<Value> = redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").query_async(con).await;
    match res {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

/// `XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s id`. `id` is `>` for new entries or `0`
/// for this consumer's own pending ones.
pub async fn read_group<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
    block: Option<Duration>,
    id: &str,
) -> RedisResult<Vec<StreamEntry>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count);
    if let Some(b) = block {
        cmd.arg("BLOCK").arg(b.as_millis() as u64);
    }
    cmd.arg("STREAMS").arg(stream).arg(id);
    let v: Value = cmd.query_async(con).await?;
    Ok(parse_read_reply(v))
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

fn parse_fields(v: &Value) -> Option<RawFields> {
    match v {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            for pair in items.chunks(2) {
                if let [k, val] = pair {
                    out.push((bytes(k)?, bytes(val)?));
                }
            }
            Some(out)
        }
        Value::Map(items) => items.iter().map(|(k, v)| Some((bytes(k)?, bytes(v)?))).collect(),
        _ => None,
    }
}

/// Parses a list of `[id, [field, value, ...]]`; a nil body means the entry was deleted.
pub fn parse_entries(v: &Value) -> Vec<StreamEntry> {
    let Value::Array(items) = v else { return Vec::new() };
    items
        .iter()
        .filter_map(|item| match item {
            Value::Array(parts) if !parts.is_empty() => {
                Some(StreamEntry { id: text(&parts[0])?, fields: parts.get(1).and_then(parse_fields) })
            }
            _ => None,
        })
        .collect()
}

fn parse_read_reply(v: Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => parse_entries(&kv[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, entries)| parse_entries(entries)).collect(),
        _ => Vec::new(),
    }
}

/// The `XPENDING key group` summary.
#[derive(Debug, Default, Clone)]
pub struct PendingSummary {
    pub count: u64,
    pub smallest: Option<String>,
    pub consumers: Vec<(String, u64)>,
}

pub async fn pending_summary<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str, group: &str) -> RedisResult<PendingSummary> {
    let v: Value = redis::cmd("XPENDING").arg(stream).arg(group).query_async(con).await?;
    let Value::Array(parts) = v else { return Ok(PendingSummary::default()) };
    let count = match parts.first() {
        Some(Value::Int(n)) => *n as u64,
        _ => 0,
    };
    let smallest = parts.get(1).and_then(text);
    let consumers = match parts.get(3) {
        Some(Value::Array(cs)) => cs
            .iter()
            .filter_map(|c| match c {
                Value::Array(p) if p.len() == 2 => Some((text(&p[0])?, text(&p[1])?.parse().ok()?)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(PendingSummary { count, smallest, consumers })
}

/// `XINFO CONSUMERS`: (consumer, pending) of a stream's group.
pub async fn group_consumers<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str, group: &str) -> RedisResult<Vec<(String, u64)>> {
    let v: Value = redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group).query_async(con).await?;
    let Value::Array(rows) = v else { return Ok(Vec::new()) };
    Ok(rows
        .iter()
        .filter_map(|row| {
            let pairs: Vec<(String, &Value)> = match row {
                Value::Array(items) => items.chunks(2).filter_map(|p| Some((text(p.first()?)?, p.get(1)?))).collect(),
                Value::Map(items) => items.iter().filter_map(|(k, v)| Some((text(k)?, v))).collect(),
                _ => return None,
            };
            let name = pairs.iter().find(|(k, _)| k == "name").and_then(|(_, v)| text(v))?;
            let pending = pairs.iter().find(|(k, _)| k == "pending").and_then(|(_, v)| text(v))?.parse().ok()?;
            Some((name, pending))
        })
        .collect())
}

/// Delivery counts of pending entries in `[start, end]` owned by `consumer`.
pub async fn delivery_counts<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    group: &str,
    start: &str,
    end: &str,
    count: usize,
    consumer: &str,
) -> RedisResult<Vec<(String, u64)>> {
    let v: Value = redis::cmd("XPENDING").arg(stream).arg(group).arg(start).arg(end).arg(count).arg(consumer).query_async(con).await?;
    let Value::Array(rows) = v else { return Ok(Vec::new()) };
    Ok(rows
        .iter()
        .filter_map(|r| match r {
            Value::Array(p) if p.len() == 4 => match &p[3] {
                Value::Int(n) => Some((text(&p[0])?, *n as u64)),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// `XAUTOCLAIM` one page: (next cursor, claimed entries, ids deleted from the stream).
pub async fn autoclaim<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle: Duration,
    cursor: &str,
    count: usize,
) -> RedisResult<(String, Vec<StreamEntry>, Vec<String>)> {
    let v: Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(cursor)
        .arg("COUNT")
        .arg(count)
        .query_async(con)
        .await?;
    let Value::Array(parts) = v else { return Ok(("0-0".into(), Vec::new(), Vec::new())) };
    let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
    let entries = parts.get(1).map(parse_entries).unwrap_or_default();
    let deleted = match parts.get(2) {
        Some(Value::Array(ids)) => ids.iter().filter_map(text).collect(),
        _ => Vec::new(),
    };
    Ok((next, entries, deleted))
}

/// An entry that could not be processed, with where it came from and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: String,
    pub detail: String,
    pub stream: String,
    pub source_id: String,
    pub fields: RawFields,
}

const DEADLETTER_META: [&str; 4] = ["reason", "detail", "stream", "source_id"];

impl DeadLetter {
    /// The dead-letter entry's fields: the metadata, then the original fields. An original
    /// field whose name collides with the metadata is kept as `original.NAME`.
    pub fn entry_fields(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
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

fn xadd_fields(pipe: &mut redis::Pipeline, stream: &str, maxlen: Option<u64>, fields: &[(Vec<u8>, Vec<u8>)]) {
    let cmd = pipe.cmd("XADD").arg(stream);
    if let Some(m) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(m);
    }
    cmd.arg("*");
    for (k, v) in fields {
        cmd.arg(k.as_slice()).arg(v.as_slice());
    }
    cmd.ignore();
}

/// Writes the dead letters and acknowledges `ack_ids` in one MULTI/EXEC, so an entry is never
/// acknowledged without its dead letter. A replica that resumes after a pause with a batch a
/// survivor has already handled writes a second copy (same `source_id`); writing a dead
/// letter only when its own XACK found the entry pending lost 2 of 914 in a chaos run with
/// paused replicas, so a rare duplicate is the price of never losing one.
pub async fn ack_with_deadletters<C: redis::aio::ConnectionLike>(
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
    let mut pipe = redis::pipe();
    pipe.atomic();
    for dl in deadletters {
        xadd_fields(&mut pipe, deadletter_stream, Some(deadletter_maxlen), &dl.entry_fields());
    }
    if !ack_ids.is_empty() {
        pipe.cmd("XACK").arg(stream).arg(group).arg(ack_ids).ignore();
    }
    pipe.query_async::<()>(con).await
}

/// Appends one entry with text fields, optionally trimmed.
pub async fn xadd<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    maxlen: Option<u64>,
    fields: &[(&str, String)],
) -> RedisResult<String> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream);
    if let Some(m) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(m);
    }
    cmd.arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(v);
    }
    cmd.query_async(con).await
}

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
pub async fn publish_triggers<C: redis::aio::ConnectionLike>(con: &mut C, triggers: &[Trigger], key_ttl: Duration) -> RedisResult<usize> {
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

/// `XLEN`: entries in a stream (0 when it does not exist).
pub async fn len<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str) -> RedisResult<u64> {
    redis::cmd("XLEN").arg(stream).query_async(con).await
}

/// Asks every replica to re-read its routing file; returns how many replicas listened.
pub async fn request_reload<C: redis::aio::ConnectionLike>(con: &mut C, channel: &str) -> RedisResult<u64> {
    redis::cmd("PUBLISH").arg(channel).arg("reload").query_async(con).await
}
