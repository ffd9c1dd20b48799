//! A stream's entries: appending them and counting them.

use redis::RedisResult;

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

/// `XLEN`: entries in a stream (0 when it does not exist).
pub async fn len<C: redis::aio::ConnectionLike>(con: &mut C, stream: &str) -> RedisResult<u64> {
    redis::cmd("XLEN").arg(stream).query_async(con).await
}
