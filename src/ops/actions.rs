//! What both the admin API and the CLI offer beyond plain reads: agents with their load, live
//! replicas from their heartbeats, and the dead-letter stream with its requeue.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::Value;
use serde::Serialize;
use sqlx::PgPool;

use crate::core::routing_file::RoutingTable;
use crate::engine::settings::Names;
use crate::engine::streams;
use crate::ops::reads;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    pub agent_id: String,
    pub roles: Vec<String>,
    pub enabled: bool,
    /// None: no cap.
    pub max_in_flight: Option<u32>,
    pub in_flight: u32,
}

/// Every agent of the routing in force, plus any agent that still has work in flight but was
/// removed from the routing file (so that work does not become invisible).
pub async fn agents(pool: &PgPool, routing: &RoutingTable) -> Result<Vec<AgentView>, sqlx::Error> {
    let mut load = reads::in_flight(pool).await?;
    let mut out: Vec<AgentView> = routing
        .agents
        .iter()
        .map(|(name, spec)| AgentView {
            agent_id: name.clone(),
            roles: spec.roles.clone(),
            enabled: spec.enabled,
            max_in_flight: spec.max_in_flight,
            in_flight: load.remove(name).unwrap_or(0),
        })
        .collect();
    let mut gone: Vec<_> = load.into_iter().collect();
    gone.sort();
    out.extend(gone.into_iter().map(|(name, n)| AgentView {
        agent_id: name,
        roles: vec![],
        enabled: false,
        max_in_flight: Some(0),
        in_flight: n,
    }));
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaView {
    pub instance: String,
    pub status: String,
    pub ts: String,
    /// Seconds since its last heartbeat.
    pub age_seconds: f64,
    /// A recent heartbeat that is not `stopping`.
    pub live: bool,
    /// Every field of its last heartbeat (version, config_version, counters, pending).
    pub heartbeat: BTreeMap<String, String>,
}

fn text_fields(raw: &crate::core::entry::RawFields) -> BTreeMap<String, String> {
    raw.iter().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned())).collect()
}

/// Replicas seen in the last `scan` heartbeats, newest first; `live` when the last one is
/// younger than `stale_after` and not `stopping`.
pub async fn replicas<C: redis::aio::ConnectionLike>(
    con: &mut C,
    health_stream: &str,
    stale_after: Duration,
    scan: usize,
) -> Result<Vec<ReplicaView>, redis::RedisError> {
    let v: Value = redis::cmd("XREVRANGE").arg(health_stream).arg("+").arg("-").arg("COUNT").arg(scan).query_async(con).await?;
    let now = chrono::Utc::now();
    let mut seen: BTreeMap<String, ReplicaView> = BTreeMap::new();
    for e in streams::parse_entries(&v) {
        let fields = text_fields(&e.fields.unwrap_or_default());
        let Some(instance) = fields.get("instance").cloned() else { continue };
        if fields.get("component").map(String::as_str) != Some("ge-orchestrator") || seen.contains_key(&instance) {
            continue;
        }
        let ts = fields.get("ts").cloned().unwrap_or_default();
        let age = chrono::DateTime::parse_from_rfc3339(&ts)
            .map(|t| (now - t.with_timezone(&chrono::Utc)).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(f64::MAX);
        let status = fields.get("status").cloned().unwrap_or_default();
        let live = status != "stopping" && age < stale_after.as_secs_f64();
        seen.insert(instance.clone(), ReplicaView { instance, status, ts, age_seconds: age.min(1e9), live, heartbeat: fields });
    }
    let mut out: Vec<ReplicaView> = seen.into_values().collect();
    out.sort_by(|a, b| b.live.cmp(&a.live).then(a.instance.cmp(&b.instance)));
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    pub id: String,
    pub reason: String,
    pub detail: String,
    pub stream: String,
    pub source_id: String,
    /// The original entry's fields, with `original.NAME` restored to `NAME`.
    pub fields: BTreeMap<String, String>,
}

const META: [&str; 4] = ["reason", "detail", "stream", "source_id"];

fn deadletter_view(id: String, raw: &crate::core::entry::RawFields) -> DeadLetterView {
    let all = text_fields(raw);
    let meta = |k: &str| all.get(k).cloned().unwrap_or_default();
    let fields = all
        .iter()
        .filter(|(k, _)| !META.contains(&k.as_str()))
        .map(|(k, v)| match k.strip_prefix("original.") {
            Some(base) if META.contains(&base) => (base.to_string(), v.clone()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    DeadLetterView { id, reason: meta("reason"), detail: meta("detail"), stream: meta("stream"), source_id: meta("source_id"), fields }
}

/// The newest `limit` dead letters, newest first, optionally of one reason.
pub async fn deadletters<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    limit: usize,
    reason: Option<&str>,
) -> Result<Vec<DeadLetterView>, redis::RedisError> {
    // A reason filter reads further back so a page of `limit` can still fill.
    let scan = if reason.is_some() { limit.saturating_mul(20).min(100_000) } else { limit };
    let v: Value = redis::cmd("XREVRANGE").arg(stream).arg("+").arg("-").arg("COUNT").arg(scan.max(1)).query_async(con).await?;
    Ok(streams::parse_entries(&v)
        .into_iter()
        .map(|e| deadletter_view(e.id, &e.fields.unwrap_or_default()))
        .filter(|d| reason.is_none_or(|r| d.reason == r))
        .take(limit)
        .collect())
}

/// Moves one dead letter back to the input stream it came from (`ge:work:incoming` when it
/// names no input stream), with the dead-letter metadata stripped and `original.NAME`
/// restored, and deletes it from the dead-letter stream, atomically: two operators pressing
/// requeue at once requeue it once.
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

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Requeue {
    Requeued {
        id: String,
        stream: String,
        new_id: String,
    },
    NotFound {
        id: String,
    },
    /// A dead letter with no original fields (e.g. `deleted`) has nothing to send again.
    Empty {
        id: String,
    },
}

pub async fn requeue<C: redis::aio::ConnectionLike>(con: &mut C, names: &Names, id: &str) -> Result<Requeue, redis::RedisError> {
    let v: Value = redis::Script::new(REQUEUE)
        .key(&names.deadletter)
        .key(&names.incoming)
        .key(&names.completed)
        .key(&names.failed)
        .arg(id)
        .invoke_async(con)
        .await?;
    let id = id.to_string();
    Ok(match v {
        Value::Int(0) => Requeue::Empty { id },
        Value::Array(parts) if parts.len() == 2 => {
            let s = |v: &Value| redis::from_redis_value_ref::<String>(v).unwrap_or_default();
            Requeue::Requeued { id, stream: s(&parts[0]), new_id: s(&parts[1]) }
        }
        _ => Requeue::NotFound { id },
    })
}

/// Requeues every dead letter (of one reason, if given), oldest first so the incoming order
/// is kept. Returns what became of each.
pub async fn requeue_all<C: redis::aio::ConnectionLike>(
    con: &mut C,
    names: &Names,
    reason: Option<&str>,
) -> Result<Vec<Requeue>, redis::RedisError> {
    let mut all = deadletters(con, &names.deadletter, 100_000, reason).await?;
    all.reverse();
    let mut out = Vec::with_capacity(all.len());
    for d in all {
        out.push(requeue(con, names, &d.id).await?);
    }
    Ok(out)
}
