//! What both the admin API and the CLI offer beyond plain reads: agents with their load, live
//! replicas from their heartbeats, and the dead-letter stream with its requeue.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::core::routing_file::RoutingTable;
use crate::engine::settings::Names;
use crate::engine::streams::{self, CUT_PREFIX, Requeued, is_deadletter_meta};
use crate::ops::reads;

#[derive(Debug, thiserror::Error)]
pub(crate) enum OpsError {
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct AgentView {
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
pub(crate) struct ReplicaView {
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
    let now = chrono::Utc::now();
    let mut seen: BTreeMap<String, ReplicaView> = BTreeMap::new();
    for e in streams::newest(con, health_stream, scan).await? {
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
pub(crate) struct DeadLetterView {
    pub id: String,
    pub reason: String,
    pub detail: String,
    pub stream: String,
    pub source_id: String,
    /// The original entry's fields, with `original.NAME` restored to `NAME`; a value in `cut`
    /// is only its start.
    pub fields: BTreeMap<String, String>,
    /// The values kept only in part, by field: their full size and SHA-256.
    pub cut: BTreeMap<String, CutValue>,
    /// Original fields left out (beyond `--max-fields`, or with an impossible name).
    pub dropped_fields: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct CutValue {
    pub bytes: u64,
    pub sha256: String,
}

fn deadletter_view(id: String, raw: &crate::core::entry::RawFields) -> DeadLetterView {
    let all = text_fields(raw);
    let meta = |k: &str| all.get(k).cloned().unwrap_or_default();
    let mut fields = BTreeMap::new();
    let mut cut: BTreeMap<String, CutValue> = BTreeMap::new();
    let mut dropped_fields = 0;
    for (k, v) in &all {
        if let Some(record) = k.strip_prefix(CUT_PREFIX) {
            if record == "fields" {
                dropped_fields = v.parse().unwrap_or_default();
            } else if let Some(name) = record.strip_suffix(".bytes") {
                cut.entry(name.to_string()).or_default().bytes = v.parse().unwrap_or_default();
            } else if let Some(name) = record.strip_suffix(".sha256") {
                cut.entry(name.to_string()).or_default().sha256 = v.clone();
            }
        } else if !is_deadletter_meta(k.as_bytes()) {
            let name = match k.strip_prefix("original.") {
                Some(base) if is_deadletter_meta(base.as_bytes()) => base,
                _ => k,
            };
            fields.insert(name.to_string(), v.clone());
        }
    }
    DeadLetterView {
        id,
        reason: meta("reason"),
        detail: meta("detail"),
        stream: meta("stream"),
        source_id: meta("source_id"),
        fields,
        cut,
        dropped_fields,
    }
}

/// Entries read per Redis command. Redis runs one command at a time, so reading the stream
/// in pages keeps any one reply (dead letters may be large) from stalling everyone else.
const PAGE: usize = 100;

/// How far back a reason filter looks for a page to fill: it stops after this many entries
/// even if the page is not full.
const SCAN_PER_ENTRY: usize = 20;
const SCAN_MAX: usize = 10_000;

/// The newest `limit` dead letters, newest first, optionally of one reason.
pub async fn deadletters<C: redis::aio::ConnectionLike>(
    con: &mut C,
    stream: &str,
    limit: usize,
    reason: Option<&str>,
) -> Result<Vec<DeadLetterView>, redis::RedisError> {
    let scan = if reason.is_some() { limit.saturating_mul(SCAN_PER_ENTRY).min(SCAN_MAX) } else { limit };
    let mut out = Vec::new();
    let (mut end, mut scanned) = ("+".to_string(), 0);
    while out.len() < limit && scanned < scan {
        let count = PAGE.min(scan - scanned);
        let page = streams::newest_before(con, stream, &end, count).await?;
        scanned += page.len();
        let last = page.len() < count;
        if let Some(e) = page.last() {
            end = format!("({}", e.id);
        }
        out.extend(
            page.into_iter().map(|e| deadletter_view(e.id, &e.fields.unwrap_or_default())).filter(|d| reason.is_none_or(|r| d.reason == r)),
        );
        if last {
            break;
        }
    }
    out.truncate(limit);
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub(crate) enum Requeue {
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
    /// A dead letter whose values or fields were cut holds only part of the entry: sending
    /// that would submit different work than the producer's.
    Cut {
        id: String,
    },
}

/// Sends one dead letter back to the input stream it came from, once however many operators
/// press requeue.
pub async fn requeue<C: redis::aio::ConnectionLike>(con: &mut C, names: &Names, id: &str) -> Result<Requeue, redis::RedisError> {
    let id = id.to_string();
    Ok(match streams::requeue_deadletter(con, names, &id).await? {
        Requeued::Sent { stream, new_id } => Requeue::Requeued { id, stream, new_id },
        Requeued::Empty => Requeue::Empty { id },
        Requeued::Cut => Requeue::Cut { id },
        Requeued::NotFound => Requeue::NotFound { id },
    })
}

/// Requeues every dead letter (of one reason, if given), oldest first so the incoming order
/// is kept. Returns what became of each. Only the dead letters there when it starts are
/// looked at: one that is dead-lettered again meanwhile (its cause not fixed) is appended
/// behind them and must not be sent round again.
pub(crate) async fn requeue_all<C: redis::aio::ConnectionLike>(
    con: &mut C,
    names: &Names,
    reason: Option<&str>,
) -> Result<Vec<Requeue>, redis::RedisError> {
    let Some(newest) = streams::newest(con, &names.deadletter, 1).await?.pop() else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let page = streams::range_page(con, &names.deadletter, &start, &newest.id, PAGE).await?;
        let last = page.len() < PAGE;
        if let Some(e) = page.last() {
            start = format!("({}", e.id);
        }
        for e in page {
            if reason.is_none_or(|r| deadletter_view(e.id.clone(), &e.fields.unwrap_or_default()).reason == r) {
                out.push(requeue(con, names, &e.id).await?);
            }
        }
        if last {
            return Ok(out);
        }
    }
}
