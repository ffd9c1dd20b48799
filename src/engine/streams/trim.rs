//! Trimming a stream to what its readers still need (contract v1.3).
//!
//! One script reads every consumer group of the stream and trims in the same atomic step, so
//! no read, claim or acknowledgement can slip in between the measure and the cut. The safe
//! point of a group is its oldest pending entry, or, with nothing pending, its last-delivered
//! id; the stream's is the smallest over its groups (`0-0` for a group that never read, which
//! keeps everything). Entries before it are acknowledged by every group: no reader can be
//! delivered them again (XREADGROUP `>` starts after last-delivered, recovery and the lane
//! gate look only at pending entries). A stream without any group has no safe point.
//! A stream without groups counts all its entries as unread.
//! A policy (age, length) cuts further, past unread entries: only trigger streams have one.
//! `XTRIM ... ~` removes whole nodes only, so a trim may leave a few entries more than asked
//! (at most one node, 100 entries by default), never fewer.

use std::time::Duration;

use redis::{RedisResult, Value};

/// KEYS[1] the stream. ARGV[1] `1` to measure only; ARGV[2] max age in ms (0: none); ARGV[3]
/// max length (0: none). Returns {length, safe point, trim point, trimmed, backlog, oldest
/// needed id, now ms}; ids are '' when there is none.
const TRIM: &str = r#"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '', '', 0, 0, '', now}
end
local len = redis.call('XLEN', KEYS[1])
local safe = nil
local needed = nil
local backlog = 0
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local point = f['last-delivered-id']
  local first_needed = nil
  if f['pending'] > 0 then
    point = redis.call('XPENDING', KEYS[1], f['name'])[2]
    first_needed = point
  else
    local next = redis.call('XRANGE', KEYS[1], '(' .. point, '+', 'COUNT', 1)[1]
    if next then first_needed = next[1] end
  end
  if safe == nil or less(point, safe) then safe = point end
  if first_needed and (needed == nil or less(first_needed, needed)) then needed = first_needed end
  local lag = f['lag']
  if not lag then lag = len end
  if f['pending'] + lag > backlog then backlog = f['pending'] + lag end
end
if safe == nil and len > 0 then
  backlog = len
  needed = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
end
local cut = safe
local max_age = tonumber(ARGV[2])
if max_age > 0 then
  local by_age = tostring(math.max(now - max_age, 0)) .. '-0'
  if cut == nil or less(cut, by_age) then cut = by_age end
end
local trimmed = 0
if ARGV[1] ~= '1' then
  if cut then trimmed = trimmed + redis.call('XTRIM', KEYS[1], 'MINID', '~', cut) end
  local max_len = tonumber(ARGV[3])
  if max_len > 0 then trimmed = trimmed + redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', max_len) end
  len = redis.call('XLEN', KEYS[1])
end
return {len, safe or '', cut or '', trimmed, backlog, needed or '', now}
"#;

/// What a trim found (and did) on one stream.
#[derive(Debug, Clone, Default)]
pub struct TrimReport {
    /// Entries in the stream (after the trim).
    pub length: u64,
    /// Entries before this id may be removed: the safe point, or later under a policy.
    pub trim_point: Option<String>,
    pub trimmed: u64,
    /// The most entries one group still has to read or acknowledge.
    pub backlog: u64,
    /// The oldest entry some group still has to read or acknowledge.
    pub oldest_needed: Option<String>,
    /// Redis's clock, in Unix milliseconds.
    pub now_ms: u64,
}

fn opt(v: Option<&Value>) -> Option<String> {
    v.and_then(super::text).filter(|s| !s.is_empty())
}

fn int(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Int(n)) => (*n).max(0) as u64,
        other => other.and_then(super::text).and_then(|s| s.parse().ok()).unwrap_or(0),
    }
}

/// Trims `stream` to what its groups still need, and further by `max_age` / `max_len` when
/// given; with `measure_only`, reports without removing anything.
pub(crate) async fn trim_stream<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    max_age: Option<Duration>,
    max_len: Option<u64>,
    measure_only: bool,
) -> RedisResult<TrimReport> {
    let v: Value = redis::cmd("EVAL")
        .arg(TRIM)
        .arg(1)
        .arg(stream)
        .arg(if measure_only { "1" } else { "0" })
        .arg(max_age.map(|d| d.as_millis().min(u64::MAX as u128) as u64).unwrap_or(0))
        .arg(max_len.unwrap_or(0))
        .query_async(con)
        .await?;
    let Value::Array(p) = v else { return Ok(TrimReport::default()) };
    Ok(TrimReport {
        length: int(p.first()),
        trim_point: opt(p.get(2)),
        trimmed: int(p.get(3)),
        backlog: int(p.get(4)),
        oldest_needed: opt(p.get(5)),
        now_ms: int(p.get(6)),
    })
}

/// `SET key owner NX PX ttl`: whether this replica has the turn (nobody else took it within
/// `ttl`). The key is never released: it lapses, and the next turn goes to whoever asks first.
pub(crate) async fn take_turn<C: redis::aio::ConnectionLike>(con: &mut C, key: &str, owner: &str, ttl: Duration) -> RedisResult<bool> {
    let v: Value = redis::cmd("SET").arg(key).arg(owner).arg("NX").arg("PX").arg(ttl.as_millis().max(1) as u64).query_async(con).await?;
    Ok(!matches!(v, Value::Nil))
}

/// `INFO memory` `used_memory`, in bytes.
pub async fn used_memory<C: redis::aio::ConnectionLike>(con: &mut C) -> RedisResult<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(con).await?;
    Ok(info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0))
}
