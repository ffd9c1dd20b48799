//! `/metrics` in the Prometheus text format: what the replica recorded (see
//! `engine::metrics`), then gauges read at scrape time. Gauges (stream lag, pending entries, work packages
//! by status, in-flight and capacity per agent) are read from Redis and PostgreSQL at scrape
//! time and rendered directly, so a consumer that left or an agent that was removed does not
//! linger as a stale series.

use std::fmt::Write as _;

use crate::core::entry::stream_id_parts;
use crate::core::status::STATUSES;
use crate::engine::budgets;
use crate::engine::context::{Ctx, Stats};
use crate::engine::input::Input;
use crate::engine::streams;
use crate::engine::trimming;
use crate::ops::reads;

/// Escapes a label value for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn num(v: f64) -> String {
    if v.is_infinite() { if v > 0.0 { "+Inf".into() } else { "-Inf".into() } } else { format!("{v}") }
}

/// Gauge families rendered at scrape time.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        if l.is_empty() {
            let _ = writeln!(self.0, "{name} {}", num(v));
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {}", l.join(","), num(v));
        }
    }
}

/// Stream lengths and trim points, the agents' distance to their trim points, the database's
/// size and the retention in force (v1.3). Returns the sources that did not answer.
async fn retention_gauges(ctx: &Ctx, out: &mut Out) -> u32 {
    let mut errors = 0;
    let measured = trimming::measure(ctx).await;
    out.family("ge_stream_length", "gauge", "Entries in a stream the orchestrator trims (input and trigger streams).");
    for (t, r) in &measured {
        match r {
            Ok(r) => out.sample("ge_stream_length", &[("stream", &t.stream)], r.length as f64),
            Err(_) => errors += 1,
        }
    }
    out.family("ge_stream_trim_point_seconds", "gauge", "Unix time of a stream's trim point: entries older may be removed.");
    for (t, r) in &measured {
        if let Some((ms, _)) = r.as_ref().ok().and_then(|r| r.trim_point.as_deref()).and_then(stream_id_parts) {
            out.sample("ge_stream_trim_point_seconds", &[("stream", &t.stream)], ms as f64 / 1000.0);
        }
    }
    out.family("ge_trigger_backlog_entries", "gauge", "Triggers an agent's slowest consumer group has not read or acknowledged.");
    out.family(
        "ge_trigger_retention_used_ratio",
        "gauge",
        "How close an agent's oldest unread trigger is to its trim point (1: at it; warned from 0.8).",
    );
    for (t, r) in &measured {
        if let (Some(agent), Ok(r)) = (&t.agent, r) {
            out.sample("ge_trigger_backlog_entries", &[("agent", agent)], r.backlog as f64);
            out.sample("ge_trigger_retention_used_ratio", &[("agent", agent)], trimming::used_ratio(r, &t.policy));
        }
    }
    match reads::database_bytes(&ctx.ops_pool).await {
        Ok(n) => {
            out.family("ge_database_bytes", "gauge", "Size of the orchestrator's PostgreSQL database.");
            out.sample("ge_database_bytes", &[], n as f64);
        }
        Err(_) => errors += 1,
    }
    out.family("ge_retention_seconds", "gauge", "How long finished work packages are kept (GE_RETENTION; +Inf: for ever).");
    let kept = ctx.settings.retention.retention.0.map(|d| d.as_secs_f64()).unwrap_or(f64::INFINITY);
    out.sample("ge_retention_seconds", &[], kept);
    errors
}

/// Every schedule's next firing and whether it is paused (v1.6), read now, so a removed
/// schedule leaves no series behind. Returns the sources that did not answer.
async fn schedule_gauges(ctx: &Ctx, out: &mut Out) -> u32 {
    let Ok(all) = crate::engine::schedule_store::list(&ctx.ops_pool).await else { return 1 };
    out.family("ge_schedule_next_firing_seconds", "gauge", "Unix time of a schedule's next firing (absent while paused).");
    for s in &all {
        if let Some(t) = s.next_firing {
            out.sample("ge_schedule_next_firing_seconds", &[("schedule", &s.name)], t.timestamp_millis() as f64 / 1000.0);
        }
    }
    out.family("ge_schedule_paused", "gauge", "1 while a schedule is paused.");
    for s in &all {
        out.sample("ge_schedule_paused", &[("schedule", &s.name)], if s.paused { 1.0 } else { 0.0 });
    }
    0
}

/// (v1.6) Spend and budgets. Labels stay bounded: agents of the routing file only; plans,
/// which are unbounded, are counted by how near their budget they are.
async fn budget_gauges(ctx: &Ctx, routing: &crate::core::routing_file::RoutingTable, out: &mut Out) -> u32 {
    let warn_at = ctx.settings.budget_warn_ratio();
    let usd = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
    let mut errors = 0;
    match budgets::overview(&ctx.ops_pool, Some(routing), warn_at, 0).await {
        Ok(o) => {
            out.family("ge_spend_usd_total", "counter", "USD an agent's reports said they cost, all time.");
            out.family("ge_spend_tokens_total", "counter", "Tokens an agent's reports said they used, all time.");
            for t in &o.agents {
                out.sample("ge_spend_usd_total", &[("agent", &t.name)], usd(&t.cost));
                out.sample("ge_spend_tokens_total", &[("agent", &t.name), ("kind", "input")], t.input_tokens as f64);
                out.sample("ge_spend_tokens_total", &[("agent", &t.name), ("kind", "output")], t.output_tokens as f64);
            }
            out.family("ge_budget_spent_usd", "gauge", "USD an agent with a budget has spent in its current UTC day or month.");
            out.family("ge_budget_limit_usd", "gauge", "An agent's budget per UTC day or month.");
            for b in o.budgets.iter().filter(|b| b.scope == "agent") {
                let labels = [("agent", b.name.as_str()), ("period", b.period.as_str())];
                out.sample("ge_budget_spent_usd", &labels, usd(&b.spent));
                out.sample("ge_budget_limit_usd", &labels, usd(b.limit.as_deref().unwrap_or("NaN")));
            }
        }
        Err(_) => errors += 1,
    }
    match budgets::plan_states(&ctx.ops_pool, warn_at).await {
        Ok(states) => {
            out.family(
                "ge_budget_plans",
                "gauge",
                "Plans with a budget: below the warning, past it (GE_BUDGET_WARN_AT), or at the budget.",
            );
            for (state, n) in states {
                out.sample("ge_budget_plans", &[("state", state)], n as f64);
            }
        }
        Err(_) => errors += 1,
    }
    errors
}

/// The whole exposition: recorded counters and histograms, then gauges read now. A source
/// that does not answer leaves its families out and sets `ge_scrape_errors`.
pub(crate) async fn render(ctx: &Ctx) -> String {
    let mut out = Out(String::new());
    let mut errors = 0u32;
    let names = &ctx.settings.names;
    let mut redis = ctx.redis.clone();

    out.family("ge_stream_lag", "gauge", "Entries of an input stream not yet delivered to the consumer group.");
    for input in Input::ALL {
        let s = input.stream(ctx);
        match streams::group_lag(&mut redis, s, &names.group).await {
            Ok(Some(lag)) => out.sample("ge_stream_lag", &[("stream", s)], lag as f64),
            Ok(None) => {}
            Err(_) => errors += 1,
        }
    }
    out.family("ge_pending_entries", "gauge", "Entries delivered but not yet acknowledged, per stream and consumer.");
    for input in Input::ALL {
        let s = input.stream(ctx);
        match streams::pending_summary(&mut redis, s, &names.group).await {
            Ok(p) => {
                for (c, n) in p.consumers {
                    out.sample("ge_pending_entries", &[("stream", s), ("consumer", &c)], n as f64);
                }
            }
            Err(_) => errors += 1,
        }
    }
    match streams::len(&mut redis, &names.deadletter).await {
        Ok(n) => {
            out.family("ge_deadletter_entries", "gauge", "Entries in the dead-letter stream.");
            out.sample("ge_deadletter_entries", &[], n as f64);
        }
        Err(_) => errors += 1,
    }

    errors += retention_gauges(ctx, &mut out).await;

    match reads::counts(&ctx.ops_pool).await {
        Ok(counts) => {
            out.family("ge_work_packages", "gauge", "Work packages by status.");
            let mut by: std::collections::BTreeMap<String, i64> = STATUSES.iter().map(|s| (s.to_string(), 0)).collect();
            by.extend(counts);
            for (s, n) in by {
                out.sample("ge_work_packages", &[("status", &s)], n as f64);
            }
        }
        Err(_) => errors += 1,
    }

    errors += schedule_gauges(ctx, &mut out).await;

    let routing = ctx.routing.get();
    match reads::in_flight(&ctx.ops_pool).await {
        Ok(in_flight) => {
            out.family("ge_agent_in_flight", "gauge", "Work packages dispatched to an agent and not yet reported.");
            for agent in routing.agents.keys() {
                out.sample("ge_agent_in_flight", &[("agent", agent)], in_flight.get(agent).copied().unwrap_or(0) as f64);
            }
        }
        Err(_) => errors += 1,
    }
    out.family("ge_agent_capacity", "gauge", "max_in_flight of an agent (+Inf: no cap; 0: disabled).");
    for (agent, spec) in &routing.agents {
        let cap = if !spec.enabled { 0.0 } else { spec.max_in_flight.map(f64::from).unwrap_or(f64::INFINITY) };
        out.sample("ge_agent_capacity", &[("agent", agent)], cap);
    }

    errors += budget_gauges(ctx, &routing, &mut out).await;

    out.family("ge_config_info", "gauge", "The routing file in force (1 for its config_version).");
    out.sample("ge_config_info", &[("config_version", &routing.config_version)], 1.0);
    out.family("ge_config_reload_failures_total", "counter", "Reloads refused because the routing file was invalid.");
    out.sample("ge_config_reload_failures_total", &[], Stats::get(&ctx.stats.reload_failures) as f64);
    out.family("ge_scrape_errors", "gauge", "Sources that did not answer during this scrape.");
    out.sample("ge_scrape_errors", &[], f64::from(errors));

    let mut text = ctx.metrics.render_recorded();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&out.0);
    text
}
