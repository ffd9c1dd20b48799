//! route_incoming: validate entries of `ge:work:incoming`, persist the work packages and
//! their edges, dead-letter what cannot be taken, acknowledge, then dispatch what may run.

use std::collections::HashSet;

use sqlx::Row;

use crate::core::entry::{self, StreamEntry, WorkPackageSpec};
use crate::core::router::{self, RouteRequest};
use crate::engine::context::Ctx;
use crate::engine::dispatch::{self, Scope};
use crate::engine::kept_events;
use crate::engine::store::{self, IngestOutcome, Routes};
use crate::engine::streams::DeadLetter;

pub async fn handle(ctx: &Ctx, entries: &[StreamEntry]) -> anyhow::Result<()> {
    let names = &ctx.settings.names;
    let traced = ctx.traces.ingest(&names.incoming, entries);
    let routing = ctx.routing.get();
    let mut specs: Vec<(WorkPackageSpec, &StreamEntry)> = Vec::with_capacity(entries.len());
    let mut targets = Vec::with_capacity(entries.len());
    let mut deadletters = Vec::new();
    // (v1.6) (plan, USD) of the entries that carry a plan's budget.
    let mut budgets: Vec<(String, String)> = Vec::new();
    let dead = |e: &StreamEntry, reason: &str, detail: String| DeadLetter::of(&names.incoming, e, reason, detail);
    for e in entries {
        let spec = match entry::parse_incoming(e, &ctx.settings.limits) {
            Ok(s) => s,
            Err(rej) => {
                deadletters.push(dead(e, rej.reason, rej.detail));
                continue;
            }
        };
        // (v1.6) A work package that waits for an approval or an event goes to no agent.
        if spec.wait.is_some() {
            targets.push(String::new());
            specs.push((spec, e));
            continue;
        }
        // Routed once, now: to an agent or a role. Which agent of a role, given the load of
        // that moment, is decided at dispatch.
        let req =
            RouteRequest { agent_id: spec.agent_id.as_deref(), work_type: spec.work_type.as_deref(), trigger: spec.trigger.as_deref() };
        match router::resolve(&req, &routing) {
            Ok(target) => targets.push(target.key()),
            Err((reason, detail)) => {
                deadletters.push(dead(e, reason.as_str(), detail));
                continue;
            }
        }
        match crate::core::usage::budget_of(&spec) {
            Ok(b) => budgets.extend(b),
            Err(detail) => {
                deadletters.push(dead(e, "invalid", detail));
                continue;
            }
        }
        specs.push((spec, e));
    }

    let plain: Vec<WorkPackageSpec> = specs.iter().map(|(s, _)| s.clone()).collect();
    // (v1.6) Before the work itself, so that no round sees a plan's work without its budget;
    // a redelivered entry sets nothing twice.
    crate::engine::budgets::set_from_entries(&ctx.pool, &budgets).await?;
    if !budgets.is_empty() {
        ctx.plan_budgets.forget();
    }
    let read_at = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    let at_once = dispatch::at_once::at_ingest(&ctx.pool, &routing, &plain, &targets).await?;
    let ingested =
        store::ingest(&ctx.pool, &plain, &Routes { targets: &targets, version: &routing.config_version, at_once: &at_once }).await?;
    let claimed: HashSet<&str> = ingested.dispatched.iter().filter_map(|r| r.try_get::<&str, _>("wp_id").ok()).collect();
    let mut inserted = Vec::new();
    let mut waits_for_events = Vec::new();
    let mut has_lanes = false;
    for ((spec, e), outcome) in specs.iter().zip(ingested.outcomes) {
        match outcome {
            IngestOutcome::Inserted if claimed.contains(spec.wp_id.as_str()) => {}
            IngestOutcome::Inserted => {
                has_lanes |= spec.lane.is_some();
                if spec.wait.as_ref().is_some_and(|w| w.key.is_some()) {
                    waits_for_events.push(spec.wp_id.clone());
                }
                inserted.push(spec.wp_id.clone());
            }
            IngestOutcome::Duplicate => {
                tracing::debug!(wp_id = %spec.wp_id, source_id = %e.id, "resubmission of an identical work package ignored")
            }
            IngestOutcome::Rejected(rej) => deadletters.push(dead(e, rej.reason, rej.detail)),
        }
    }

    // (v1.6) An event that came before the work package waiting for it was kept for it.
    if !waits_for_events.is_empty() {
        kept_events::settle(ctx, &waits_for_events).await?;
    }

    traced.end(&deadletters);
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    // Already durable: a failed round only delays dispatch until the scheduler's next sweep.
    // A batch with lane members is acknowledged first, since the lane gate of the round holds
    // work behind entries still pending, these included; other batches are acknowledged and
    // dispatched together.
    // What the ingest claimed at once is published with the round over the rest.
    tracing::debug!(inserted = ?inserted, claimed = ?claimed, "ingest batch stored");
    let scope = Scope::ids(inserted);
    let round = async {
        let at_once = dispatch::publish_claimed(ctx, &ingested.dispatched, |_| Some(read_at)).await?;
        Ok::<usize, anyhow::Error>(at_once + dispatch::round(ctx, &scope).await?)
    };
    let dispatched = if has_lanes {
        ctx.ack(&names.incoming, &ids, &deadletters).await?;
        round.await
    } else {
        let (acked, dispatched) = tokio::join!(ctx.ack(&names.incoming, &ids, &deadletters), round);
        acked?;
        dispatched
    };
    if let Err(e) = dispatched {
        tracing::warn!(error = format!("{e:#}"), "dispatch after ingest failed; the scheduler will retry");
        ctx.stats.note_error();
    }
    Ok(())
}
