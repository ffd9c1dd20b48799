//! A stream's entries: appending, reading and counting them.

use redis::{RedisResult, ToRedisArgs, Value};

use super::parse_entries;
use crate::core::entry::StreamEntry;

/// The XADD of one entry, trimmed to about `maxlen` entries when given.
pub(super) fn xadd_cmd<K: ToRedisArgs, V: ToRedisArgs>(stream: &str, maxlen: Option<u64>, fields: &[(K, V)]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream);
    if let Some(m) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(m);
    }
    cmd.arg("*");
    for (k, v) in fields {
        cmd.arg(k).arg(v);
    }
    cmd
}

/// Appends one entry, optionally trimmed; returns its id.
pub async fn xadd<C: redis::aio::ConnectionLike, K: ToRedisArgs, V: ToRedisArgs>(
    con: &mut C,
    stream: &str,
    maxlen: Option<u64>,
    fields: &[(K, V)],
) -> RedisResult<String> {
    xadd_cmd(stream, maxlen, fields).query_async(con).await
}

/// Appends `entries` in order in one pipeline (one round trip, not atomic); returns their ids.
pub(crate) async fn xadd_many<C, F, K, V>(con: &mut C, stream: &str, entries: &[F]) -> RedisResult<Vec<String>>
where
    C: redis::aio::ConnectionLike,
    F: AsRef<[(K, V)]>,
    K: ToRedisArgs,
    V: ToRedisArgs,
{
    let mut pipe = redis::pipe();
    for fields in entries {
        pipe.add_command(xadd_cmd(stream, None, fields.as_ref()));
    }
    pipe.query_async(con).await
}

/// Appends `entries` in order in one pipeline, confirmed like triggers (see
/// `publish_triggers`): with Sentinel, the pipeline ends with `WAIT`, and fewer
/// acknowledgements than asked is an error, so that the caller sends them again later (a
/// schedule's firing: the same wp_ids and fields again are a no-op for ingest).
pub(crate) async fn xadd_many_confirmed(
    con: &mut super::MasterConnection,
    stream: &str,
    entries: &[Vec<(String, String)>],
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    for fields in entries {
        pipe.add_command(xadd_cmd(stream, None, fields));
    }
    super::endpoint::query_confirmed(con, pipe, "entries").await?;
    Ok(())
}

/// `XLEN`: entries in a stream (0 when it does not exist).
pub async fn len<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str) -> RedisResult<u64> {
    redis::cmd("XLEN").arg(stream).query_async(con).await
}

/// `XRANGE`: the entries from `start` to `end`, both included, oldest first.
pub(crate) async fn range<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    start: &str,
    end: &str,
) -> RedisResult<Vec<StreamEntry>> {
    let v: Value = redis::cmd("XRANGE").arg(stream).arg(start).arg(end).query_async(con).await?;
    Ok(parse_entries(&v))
}

/// `XRANGE ... COUNT`: at most `count` entries from `start` to `end`, oldest first. A bound
/// written `(ID` excludes that id, so the next page starts after the last one seen.
pub(crate) async fn range_page<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    start: &str,
    end: &str,
    count: usize,
) -> RedisResult<Vec<StreamEntry>> {
    let v: Value = redis::cmd("XRANGE").arg(stream).arg(start).arg(end).arg("COUNT").arg(count).query_async(con).await?;
    Ok(parse_entries(&v))
}

/// `XREVRANGE ... COUNT`: at most `count` entries from `end` back, newest first (`+` for the
/// newest; `(ID` for the page before that id).
pub(crate) async fn newest_before<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    end: &str,
    count: usize,
) -> RedisResult<Vec<StreamEntry>> {
    let v: Value = redis::cmd("XREVRANGE").arg(stream).arg(end).arg("-").arg("COUNT").arg(count).query_async(con).await?;
    Ok(parse_entries(&v))
}

/// The newest `count` entries, newest first.
pub(crate) async fn newest<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str, count: usize) -> RedisResult<Vec<StreamEntry>> {
    newest_before(con, stream, "+", count).await
}
