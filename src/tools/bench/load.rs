//! The benchmark's side of the traffic: the work it submits, a producer that fills the
//! incoming stream in pipelines, and fake agents that note when each trigger arrived and,
//! when asked, complete it at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use crate::engine::settings::Names;
use crate::engine::streams::{self, Reader};
use crate::tools::bench::report::Latency;

/// Wall-clock microseconds; every timestamp of the benchmark is taken in this one process.
pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// One work package to submit, and which others must finish before it may start (its
/// dependencies and its lane predecessor), for the completion-to-dispatch latency.
#[derive(Debug, Clone)]
pub(crate) struct Wp {
    pub wp_id: String,
    pub fields: Vec<(&'static str, String)>,
    pub prereqs: Vec<String>,
}

/// `n` independent work packages.
pub(crate) fn independent(n: usize, prefix: &str) -> Vec<Wp> {
    (0..n).map(|i| Wp { wp_id: format!("{prefix}{i}"), fields: vec![("work_type", "build".into())], prereqs: Vec::new() }).collect()
}

/// `plans` plans of 10: a root; two lanes of three that start from it; a fan-in of both lanes;
/// then a lane of two after the fan-in.
pub fn plans(plans: usize, prefix: &str) -> Vec<Wp> {
    let mut out = Vec::with_capacity(plans * 10);
    for p in 0..plans {
        let id = |i: usize| format!("{prefix}{p}.{i}");
        let wp = |i: usize, lane: Option<&str>, deps: &[usize], prev: Option<usize>| {
            let mut fields = vec![("work_type", "build".to_string())];
            if let Some(l) = lane {
                fields.push(("lane", format!("{prefix}{p}-{l}")));
            }
            if !deps.is_empty() {
                fields.push(("depends_on", deps.iter().map(|d| id(*d)).collect::<Vec<_>>().join(",")));
            }
            let prereqs = deps.iter().chain(prev.iter()).map(|d| id(*d)).collect();
            Wp { wp_id: id(i), fields, prereqs }
        };
        out.push(wp(0, None, &[], None));
        out.push(wp(1, Some("a"), &[0], None));
        out.push(wp(2, Some("a"), &[], Some(1)));
        out.push(wp(3, Some("a"), &[], Some(2)));
        out.push(wp(4, Some("b"), &[0], None));
        out.push(wp(5, Some("b"), &[], Some(4)));
        out.push(wp(6, Some("b"), &[], Some(5)));
        out.push(wp(7, None, &[3, 6], None));
        out.push(wp(8, Some("c"), &[7], None));
        out.push(wp(9, Some("c"), &[], Some(8)));
    }
    out
}

/// `chains` chains of 10, chain after chain: each work package depends on the one before it
/// in its chain (`depends_on`) and is routed by work type, through the agents' role.
pub(crate) fn chains(chains: usize, prefix: &str) -> Vec<Wp> {
    let mut out = Vec::with_capacity(chains * 10);
    for c in 0..chains {
        for i in 0..10 {
            let mut fields = vec![("work_type", "build".to_string())];
            let prereqs: Vec<String> = (i > 0).then(|| format!("{prefix}{c}.{}", i - 1)).into_iter().collect();
            if let Some(p) = prereqs.first() {
                fields.push(("depends_on", p.clone()));
            }
            out.push(Wp { wp_id: format!("{prefix}{c}.{i}"), fields, prereqs });
        }
    }
    out
}

/// Sending at a steady rate: `per_send` entries in one pipeline, every `per_send / rate`
/// seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    pub rate: u32,
    pub per_send: usize,
}

impl Pace {
    /// `rate` WP/s as evenly as ticks of 10 ms allow.
    pub(crate) fn steady(rate: u32) -> Pace {
        Pace { rate, per_send: (rate as usize / 100).max(1) }
    }
}

/// From the moment each work package with prerequisites could run (the last of its
/// prerequisites' completions and its own entry's sending, since a step sent after its
/// prerequisite completed cannot have been waiting for it) to seeing its trigger.
pub(crate) fn completion_to_dispatch(wps: &[Wp], l: &AgentLog) -> Latency {
    Latency::from_us(wps.iter().filter_map(|w| {
        let seen = *l.seen.get(&w.wp_id)?;
        let done = w.prereqs.iter().map(|p| l.completed.get(p).copied()).collect::<Option<Vec<u64>>>()?.into_iter().max()?;
        let ready = l.sent.get(&w.wp_id).map_or(done, |sent| done.max(*sent));
        Some(seen.saturating_sub(ready))
    }))
}

/// Submits `wps` in stream order, in pipelines, each entry stamped with its send time. With a
/// rate, sends a slice every 10 ms to hold it; without, as fast as Redis takes them. Returns
/// the entry id of each work package and the time the first was sent.
pub(crate) async fn produce(
    con: &mut MultiplexedConnection,
    stream: &str,
    wps: &[Wp],
    pace: Option<Pace>,
    token: &CancellationToken,
) -> redis::RedisResult<(Vec<(String, String)>, u64)> {
    let (chunk, tick) = match pace {
        Some(Pace { rate, per_send }) => (per_send.max(1), Duration::from_secs_f64(per_send.max(1) as f64 / f64::from(rate.max(1)))),
        None => (500, Duration::ZERO),
    };
    let started = tokio::time::Instant::now();
    let first = now_us();
    let mut ids = Vec::with_capacity(wps.len());
    for (n, slice) in wps.chunks(chunk).enumerate() {
        if token.is_cancelled() {
            break;
        }
        if pace.is_some() {
            tokio::time::sleep_until(started + tick * n as u32).await;
        }
        let sent = now_us().to_string();
        let entries: Vec<Vec<(&str, &str)>> = slice
            .iter()
            .map(|wp| {
                [("wp_id", wp.wp_id.as_str()), ("bench_sent_us", &sent)]
                    .into_iter()
                    .chain(wp.fields.iter().map(|(k, v)| (*k, v.as_str())))
                    .collect()
            })
            .collect();
        let replies = streams::xadd_many(con, stream, &entries).await?;
        ids.extend(slice.iter().map(|w| w.wp_id.clone()).zip(replies));
    }
    Ok((ids, first))
}

/// What the fake agents saw, in microseconds of `now_us`.
#[derive(Default)]
pub(crate) struct AgentLog {
    /// When each work package's trigger arrived.
    pub seen: HashMap<String, u64>,
    /// The trigger's `bench_sent_us`: when its incoming entry was sent.
    pub sent: HashMap<String, u64>,
    /// When each work package's completion was sent.
    pub completed: HashMap<String, u64>,
    /// Triggers per dispatch_id; more than one is a duplicate.
    pub dispatch_ids: HashMap<String, u32>,
}

impl AgentLog {
    pub fn duplicates(&self) -> usize {
        self.dispatch_ids.values().filter(|n| **n > 1).count()
    }

    /// From sending each incoming entry to seeing its trigger.
    pub fn ingest_to_trigger(&self) -> Latency {
        Latency::from_us(self.seen.iter().filter_map(|(wp, at)| Some(at.saturating_sub(*self.sent.get(wp)?))))
    }
}

/// A fake agent on `triggers.{agent}`: records each trigger, and completes it at once when
/// `complete` is set. Its own consumer group, as the reference agent has.
pub async fn agent(client: redis::Client, agent: String, complete: bool, log: Arc<Mutex<AgentLog>>, token: CancellationToken) {
    let names = Names::default();
    let stream = names.trigger_stream(&agent);
    let group = format!("bench-{agent}");
    let Ok(mut con) = streams::manager(&client).await else { return };
    let _ = streams::ensure_group(&mut con, &stream, &group).await;
    let mut reader =
        Reader::new(streams::Endpoint::direct(client), &stream, &group, "bench", 1000, Duration::from_millis(200)).new_entries_only();
    while let Some(entries) = reader.next(&token).await {
        let at = now_us();
        let mut done = Vec::with_capacity(entries.len());
        {
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            for e in &entries {
                let get = |name: &str| e.field(name);
                let (Some(wp), Some(dispatch)) = (get("wp_id"), get("dispatch_id")) else { continue };
                *l.dispatch_ids.entry(dispatch.clone()).or_default() += 1;
                if let Some(sent) = get("bench_sent_us").and_then(|s| s.parse().ok()) {
                    l.sent.entry(wp.clone()).or_insert(sent);
                }
                l.seen.entry(wp.clone()).or_insert(at);
                done.push((wp, dispatch));
            }
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let reports: Vec<[(&str, &str); 3]> = match complete {
            true => done.iter().map(|(wp, dispatch)| [("wp_id", wp.as_str()), ("dispatch_id", dispatch), ("agent_id", &agent)]).collect(),
            false => Vec::new(),
        };
        let sent_at = now_us();
        if streams::report_and_ack(&mut con, &names.completed, &reports, &stream, &group, &ids).await.is_ok() && complete {
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            for (wp, _) in done {
                l.completed.entry(wp).or_insert(sent_at);
            }
        }
        reader.backoff.reset();
    }
}

/// Starts one fake agent per name; they stop with `token`.
pub fn agents(
    client: &redis::Client,
    names: &[&str],
    complete: bool,
    log: &Arc<Mutex<AgentLog>>,
    token: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    names.iter().map(|a| tokio::spawn(agent(client.clone(), a.to_string(), complete, log.clone(), token.clone()))).collect()
}

/// Waits until `done(log)` holds, or `timeout`. Returns whether it held.
pub(crate) async fn wait_for(log: &Arc<Mutex<AgentLog>>, timeout: Duration, done: impl Fn(&AgentLog) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done(&log.lock().unwrap_or_else(|p| p.into_inner())) {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
