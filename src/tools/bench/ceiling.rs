//! The Redis ceiling: a loop that does what a replica does in Redis for each batch of the route
//! workload — read the group with the same batch size, publish each trigger through the same
//! once-only script, acknowledge — with no PostgreSQL and no routing. (Its entries have no
//! lane, so a replica asks no XPENDING for the lane gate either.) What the
//! orchestrator reaches, divided by this, is the share of Redis's speed it keeps.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::settings::Names;
use crate::engine::streams::{self, Reader, Trigger};

/// One consumer of the ceiling loop; run as many as there are replicas.
pub async fn consumer(
    client: redis::Client,
    stream: String,
    name: String,
    agents: Vec<String>,
    batch: usize,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let names = Names::default();
    let endpoint = streams::Endpoint::direct(client);
    let mut manager = streams::MasterConnection::connect(&endpoint).await?;
    streams::ensure_group(&mut manager, &stream, &names.group).await?;
    let mut reader = Reader::new(endpoint, &stream, &names.group, &name, batch, Duration::from_millis(200)).new_entries_only();
    let mut next_agent = 0usize;
    while let Some(entries) = reader.next(&token).await {
        let triggers: Vec<Trigger> = entries
            .iter()
            .map(|e| {
                let mut fields: Vec<(String, String)> = e
                    .fields
                    .iter()
                    .flatten()
                    .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()))
                    .collect();
                let wp = fields.iter().find(|(k, _)| k == "wp_id").map(|(_, v)| v.clone()).unwrap_or_default();
                let dispatch_id = format!("{wp}:1");
                let agent = &agents[next_agent % agents.len()];
                next_agent += 1;
                fields.push(("agent_id".into(), agent.clone()));
                fields.push(("dispatch_id".into(), dispatch_id.clone()));
                Trigger { stream: names.trigger_stream(agent), dispatch_key: names.dispatch_key(&dispatch_id), fields }
            })
            .collect();
        streams::publish_triggers(&mut manager, &triggers, Duration::from_secs(3600)).await?;
        let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
        // No dead letters are written here; only the acknowledgement is measured.
        let bounds = streams::DeadLetterBounds { maxlen: 1000, value_bytes: 4096, max_fields: 256 };
        streams::ack_with_deadletters(&mut manager, &stream, &names.group, &ids, &[], &names.deadletter, bounds).await?;
    }
    Ok(())
}
