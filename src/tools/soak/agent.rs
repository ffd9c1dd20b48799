//! The soak's agents: complete every trigger at once and check, as each arrives, what a long
//! run must keep: no dispatch_id twice, and nothing started before what it waits for (its
//! dependencies and its lane predecessor, carried in the entry's `soak_after` field) was
//! completed. They keep sets of ids, not timings, so their memory is what the run checks.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::settings::Names;
use crate::engine::streams::{self, Reader};

#[derive(Default)]
pub(crate) struct Seen {
    pub completed: HashSet<String>,
    pub dispatch_ids: HashSet<String>,
    pub duplicates: u64,
    /// Work packages triggered before one they wait for was completed.
    pub out_of_order: Vec<String>,
}

pub(crate) async fn agent(client: redis::Client, agent: String, seen: Arc<Mutex<Seen>>, token: CancellationToken) {
    let names = Names::default();
    let stream = names.trigger_stream(&agent);
    let group = format!("soak-{agent}");
    let Ok(mut con) = streams::manager(&client).await else { return };
    let _ = streams::ensure_group(&mut con, &stream, &group).await;
    let mut reader = Reader::new(streams::Endpoint::direct(client), &stream, &group, "soak", 1000, Duration::from_millis(200));
    while let Some(entries) = reader.next(&token).await {
        let mut done = Vec::with_capacity(entries.len());
        {
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            for e in &entries {
                let get = |name: &str| e.field(name);
                let (Some(wp), Some(dispatch)) = (get("wp_id"), get("dispatch_id")) else { continue };
                if !s.dispatch_ids.insert(dispatch.clone()) {
                    s.duplicates += 1;
                    continue;
                }
                let after = get("soak_after").unwrap_or_default();
                if after.split(',').filter(|p| !p.is_empty()).any(|p| !s.completed.contains(p)) {
                    s.out_of_order.push(format!("{wp} before one of {after}"));
                }
                done.push((wp, dispatch));
            }
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let reports: Vec<[(&str, &str); 3]> =
            done.iter().map(|(wp, dispatch)| [("wp_id", wp.as_str()), ("dispatch_id", dispatch), ("agent_id", &agent)]).collect();
        // Recorded as completed before the report goes out: the report unblocks dependents,
        // whose triggers may arrive on another agent before this call returns.
        {
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            s.completed.extend(done.iter().map(|(wp, _)| wp.clone()));
        }
        if let Err(e) = streams::report_and_ack(&mut con, &names.completed, &reports, &stream, &group, &ids).await {
            tracing::warn!(error = %e, agent_id = %agent, "soak agent could not report; its triggers stay pending");
            {
                let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                for (wp, dispatch) in &done {
                    s.completed.remove(wp);
                    s.dispatch_ids.remove(dispatch);
                }
            }
            reader.backoff.wait(&token).await;
            continue;
        }
        reader.backoff.reset();
    }
}
