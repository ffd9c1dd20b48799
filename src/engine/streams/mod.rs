//! Redis at the edge: connections, the shape of Redis replies, and one function for each
//! command the crate sends. Everything that knows the shape of a Redis reply lives in this
//! module: a stream's entries in `entries`, consumer groups in `group`, acknowledgements
//! together with what must not exist without them in `ack`, trigger publication in
//! `publish`, trimming to what readers still need in `trim`, and `Reader`, the one loop that reads a consumer group. Where Redis is (one
//! address, or Sentinels that name the master) is an [`Endpoint`]; every connection of a
//! replica is made through one, so that it follows a failover.

mod ack;
mod channel;
mod endpoint;
mod entries;
mod group;
mod notices;
mod publish;
mod reader;
mod trim;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisResult, Value};

use crate::core::entry::{RawFields, StreamEntry};
pub(crate) use ack::{
    CUT_PREFIX, DeadLetter, DeadLetterBounds, Requeued, ack_with_deadletters, is_deadletter_meta, report_and_ack, requeue_deadletter,
};
pub(crate) use channel::{Heard, listen};
pub(crate) use endpoint::{Confirm, info, master_addr, role};
pub use endpoint::{Endpoint, MasterConnection};
pub use entries::{len, xadd};
pub(crate) use entries::{newest, newest_before, range, range_page, xadd_many, xadd_many_confirmed};
pub(crate) use group::{autoclaim, claim, delivered_and_pending, delivery_counts, group_lag, keep_claimed, remove_consumer};
pub use group::{ensure_group, group_consumers, is_nogroup, pending_summary, read_group};
pub(crate) use notices::{publish_cancels, read_after, request_wake};
pub use publish::Trigger;
pub(crate) use publish::{MAX_ENTRY_FIELDS, Published, publish_triggers, request_reload};
pub(crate) use reader::{Reader, Trouble};
pub use trim::used_memory;
pub(crate) use trim::{TrimReport, take_turn, trim_stream};

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

/// Connection for short commands to one address; reconnects on its own after Redis restarts,
/// to the same address. The replica's connections are [`MasterConnection`]s instead.
pub async fn manager(client: &Client) -> RedisResult<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2);
    client.get_connection_manager_with_config(cfg).await
}

/// A [`MasterConnection`] for the Redis of `url` (see [`Endpoint::parse`]); errors never
/// repeat the password.
pub async fn connect(url: &str) -> anyhow::Result<MasterConnection> {
    use anyhow::Context;
    let endpoint = Endpoint::parse(url)?;
    MasterConnection::connect(&endpoint).await.with_context(|| format!("connecting to {}", endpoint.shown()))
}

/// Connection for one blocking reader. It has no response timeout: the default 500 ms would
/// fail every `XREADGROUP ... BLOCK` longer than that and leave the connection wedged.
pub(crate) async fn blocking(client: &Client) -> RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new().set_connection_timeout(Some(Duration::from_secs(5))).set_response_timeout(None);
    client.get_multiplexed_async_connection_with_config(&cfg).await
}

/// `PING`: whether Redis answers.
pub(crate) async fn ping<C: redis::aio::ConnectionLike>(con: &mut C) -> RedisResult<()> {
    redis::cmd("PING").query_async(con).await
}

/// `WAIT replicas timeout`: how many replicas have acknowledged every write this connection
/// made so far. A producer whose entry must survive a Redis failover waits for one after its
/// XADD, and sends the entry again when none confirmed it.
pub async fn wait_for_replicas<C: redis::aio::ConnectionLike>(con: &mut C, replicas: u32, timeout: Duration) -> RedisResult<u32> {
    redis::cmd("WAIT").arg(replicas).arg(timeout.as_millis().max(1) as u64).query_async(con).await
}

/// `FLUSHALL`: empties the whole Redis, for the benchmark's runs.
pub(crate) async fn flush_all<C: redis::aio::ConnectionLike>(con: &mut C) -> RedisResult<()> {
    redis::cmd("FLUSHALL").query_async(con).await
}

/// `SET key value PX ttl`: a key that disappears unless set again within `ttl`.
pub(crate) async fn set_expiring<C: redis::aio::ConnectionLike>(con: &mut C, key: &str, value: &str, ttl: Duration) -> RedisResult<()> {
    redis::cmd("SET").arg(key).arg(value).arg("PX").arg(ttl.as_millis() as u64).query_async(con).await
}

pub(crate) async fn key_exists<C: redis::aio::ConnectionLike>(con: &mut C, key: &str) -> RedisResult<bool> {
    redis::cmd("EXISTS").arg(key).query_async(con).await
}

pub(crate) async fn delete_key<C: redis::aio::ConnectionLike>(con: &mut C, key: &str) -> RedisResult<()> {
    redis::cmd("DEL").arg(key).query_async(con).await
}

pub(super) fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

pub(super) fn text(v: &Value) -> Option<String> {
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

pub(super) fn parse_read_reply(v: Value) -> Vec<StreamEntry> {
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
