//! Consumer groups: creating one, reading it, and what is pending in it.

use std::time::Duration;

use redis::{RedisResult, Value};

use super::{parse_entries, parse_read_reply, text};
use crate::core::entry::StreamEntry;

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

/// The `XPENDING key group` summary.
#[derive(Debug, Default, Clone)]
pub struct PendingSummary {
    pub count: u64,
    pub smallest: Option<String>,
    pub consumers: Vec<(String, u64)>,
}

pub async fn pending_summary<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str, group: &str) -> RedisResult<PendingSummary> {
    let v: Value = redis::cmd("XPENDING").arg(stream).arg(group).query_async(con).await?;
    Ok(summary_of(v))
}

/// The summary form of an `XPENDING` reply.
fn summary_of(v: Value) -> PendingSummary {
    let Value::Array(parts) = v else { return PendingSummary::default() };
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
    PendingSummary { count, smallest, consumers }
}

/// A group's position on a stream in one round trip: the last entry it delivered (`XINFO
/// GROUPS`) and the smallest entry still pending in it (`XPENDING`), as entry ids. What a
/// claim needs to know that no earlier entry is on its way (see `dispatch::at_once`).
pub(crate) async fn delivered_and_pending<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    group: &str,
) -> RedisResult<(Option<String>, Option<String>)> {
    let (groups, pending): (Vec<std::collections::HashMap<String, Value>>, Value) =
        redis::pipe().cmd("XINFO").arg("GROUPS").arg(stream).cmd("XPENDING").arg(stream).arg(group).query_async(con).await?;
    let delivered = groups
        .iter()
        .find(|g| g.get("name").and_then(text).as_deref() == Some(group))
        .and_then(|g| g.get("last-delivered-id").and_then(text));
    Ok((delivered, summary_of(pending).smallest))
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
pub(crate) async fn delivery_counts<C: redis::aio::ConnectionLike>(
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
pub(crate) async fn autoclaim<C: redis::aio::ConnectionLike>(
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

/// `XCLAIM` of `ids` for `consumer`, however long they have been idle. An id deleted from the
/// stream or acknowledged meanwhile does not come back.
pub(crate) async fn claim<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    ids: &[String],
) -> RedisResult<Vec<StreamEntry>> {
    let v: Value = redis::cmd("XCLAIM").arg(stream).arg(group).arg(consumer).arg(0).arg(ids).query_async(con).await?;
    Ok(parse_entries(&v))
}

/// `XGROUP DELCONSUMER`: removes `consumer` from the group, with whatever it still had pending.
pub(crate) async fn remove_consumer<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
) -> RedisResult<()> {
    redis::cmd("XGROUP").arg("DELCONSUMER").arg(stream).arg(group).arg(consumer).query_async(con).await
}

/// The lag of the group on a stream (`XINFO GROUPS`, Redis 7+): entries not yet delivered.
/// None when the group does not exist or Redis cannot tell.
pub(crate) async fn group_lag<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str, group: &str) -> RedisResult<Option<i64>> {
    let groups: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(con).await?;
    for g in groups {
        let name: Option<String> = g.get("name").and_then(|v| redis::from_redis_value_ref(v).ok());
        if name.as_deref() == Some(group) {
            return Ok(g.get("lag").and_then(|v| redis::from_redis_value_ref::<i64>(v).ok()));
        }
    }
    Ok(None)
}

/// An XCLAIM of an entry by the consumer that has it, in one script with the check that it
/// still has it. JUSTID: it does not count as a delivery.
const KEEP_CLAIMED: &str = r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"#;

/// Sets the idle time of `id` back to zero while it is pending with `consumer`, so that the
/// XAUTOCLAIM of another consumer does not take an entry its owner is still working on. False
/// when it is no longer pending with `consumer` (acknowledged, or claimed by another).
pub(crate) async fn keep_claimed<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    id: &str,
) -> RedisResult<bool> {
    redis::Script::new(KEEP_CLAIMED).key(stream).arg(group).arg(consumer).arg(id).invoke_async(con).await
}
