//! process_completions: apply `ge:work:completed` and `ge:work:failed` reports, then dispatch
//! what they unblock (dependents, the lane's next work package, work waiting for a slot).

use crate::core::entry::{self, StreamEntry};
use crate::core::usage::{self, Usage};
use crate::engine::budgets;
use crate::engine::context::{Ctx, Stats};
use crate::engine::dispatch::{self, Ready, Scope};
use crate::engine::input::Input;
use crate::engine::store::{self, ReportOutcome};
use crate::engine::streams::DeadLetter;

/// A report that passed validation, in stream order.
struct Report<'a> {
    wp_id: String,
    dispatch_id: Option<String>,
    entry: &'a StreamEntry,
    fields: std::collections::BTreeMap<String, String>,
    /// (v1.6) What it says it used; None when it says nothing, or nothing valid.
    usage: Option<Usage>,
}

pub async fn handle(ctx: &Ctx, input: Input, entries: &[StreamEntry]) -> anyhow::Result<()> {
    let stream = input.stream(ctx).to_string();
    let routing = ctx.routing.get();
    let mut deadletters = Vec::new();
    let mut changed = Vec::new();
    let (mut completed, mut failed) = (0u64, 0u64);
    // (wp_id, completed?) of the reports applied, for the per-agent metrics, and the (agent,
    // route kind) of each completion, which its statement returned.
    let mut reported: Vec<(String, bool)> = Vec::new();
    let mut completed_routes: Vec<(String, String)> = Vec::new();
    let mut reports: Vec<Report<'_>> = Vec::new();
    for e in entries {
        let dead = |reason: &str, detail: String| DeadLetter::of(&stream, e, reason, detail);
        let Some(raw) = &e.fields else {
            deadletters.push(dead("deleted", "the entry was deleted from the stream before it was processed".into()));
            continue;
        };
        let fields = match entry::decode_fields(raw, &ctx.settings.limits) {
            Ok(f) => f,
            Err(rej) => {
                deadletters.push(dead(rej.reason, rej.detail));
                continue;
            }
        };
        let wp_id = match fields.get("wp_id") {
            Some(w) if entry::is_valid_wp_id(w) => w.clone(),
            Some(w) => {
                deadletters.push(dead("invalid", format!("wp_id {} is not a valid work package id", entry::excerpt(w))));
                continue;
            }
            None => {
                deadletters.push(dead("invalid", format!("an entry of {stream} needs a wp_id field")));
                continue;
            }
        };
        let dispatch_id = fields.get("dispatch_id").filter(|d| !d.is_empty()).cloned();
        if let Some(d) = dispatch_id.as_deref().filter(|d| d.contains('\0')) {
            deadletters.push(dead(
                "invalid",
                format!("dispatch_id {} contains a NUL byte; report the dispatch_id of the trigger", entry::excerpt(d)),
            ));
            continue;
        }
        // Malformed usage never costs the report: it applies without its usage, and the usage
        // is dead-lettered with what is wrong with it (the reason `invalid_usage`).
        let usage = match usage::parse(&fields) {
            Ok(u) => u,
            Err(why) => {
                deadletters.push(dead("invalid_usage", format!("{why}; the report was applied without its usage")));
                None
            }
        };
        reports.push(Report { wp_id, dispatch_id, entry: e, fields, usage });
    }

    // Read before the transaction, beside its BEGIN: lane successors claimed at once need it.
    // Failure reports complete nothing, so let nothing go.
    let gate = async {
        if input == Input::Completed { dispatch::at_once::LaneGate::read(ctx).await } else { dispatch::at_once::LaneGate::default() }
    };
    let (gate, tx) = tokio::join!(gate, ctx.pool.begin());
    let mut tx = tx?;
    let outcomes: Vec<ReportOutcome> = match input {
        // The hot path: every completion of the batch in one statement.
        Input::Completed => {
            let batch: Vec<(&str, Option<&str>, Option<String>)> = reports
                .iter()
                .map(|r| (r.wp_id.as_str(), r.dispatch_id.as_deref(), r.fields.get("result").map(|t| entry::report_text(t).into_owned())))
                .collect();
            store::complete_many(&mut tx, &batch).await?
        }
        _ => {
            let mut out = Vec::with_capacity(reports.len());
            for r in &reports {
                let error = entry::report_text(r.fields.get("error").map(String::as_str).unwrap_or("(no error text given)"));
                let retryable = !matches!(r.fields.get("retryable").map(String::as_str), Some("false"));
                out.push(store::fail(&mut tx, &r.wp_id, r.dispatch_id.as_deref(), &error, retryable, &routing.retry).await?);
            }
            out
        }
    };
    // Reports that changed nothing; those of cancelled work go into its history (v1.6).
    let mut late: Vec<(String, Option<String>, &str)> = Vec::new();
    let kind = if input == Input::Completed { "completion" } else { "failure report" };
    for (Report { wp_id, dispatch_id, entry: e, .. }, outcome) in reports.iter().zip(outcomes) {
        if matches!(outcome, ReportOutcome::Stale(_)) {
            late.push((wp_id.clone(), dispatch_id.clone(), kind));
        }
        let dispatch_id = dispatch_id.as_deref();
        match outcome {
            ReportOutcome::Completed { agent, route } => {
                completed += 1;
                reported.push((wp_id.clone(), true));
                completed_routes.push((agent, route));
                tracing::info!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), "work package completed");
                changed.push(wp_id.clone());
            }
            ReportOutcome::RetryWait { delay_ms } => {
                failed += 1;
                reported.push((wp_id.clone(), false));
                tracing::info!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), delay_ms, "attempt failed; will retry");
            }
            ReportOutcome::Failed => {
                failed += 1;
                reported.push((wp_id.clone(), false));
                tracing::warn!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), "work package failed; no attempts left");
            }
            ReportOutcome::Stale(why) => tracing::info!(wp_id = %wp_id, dispatch_id = dispatch_id.unwrap_or(""), "{why}"),
            ReportOutcome::UnknownWp => deadletters.push(DeadLetter::of(
                &stream,
                e,
                "unknown_wp",
                format!(
                    "no work package {wp_id} is known: it was never submitted (check the agent reports the wp_id of its trigger), \
                     or it finished longer ago than the retention period (GE_RETENTION) and was removed"
                ),
            )),
        }
    }
    store::record_late_reports(&mut tx, &late).await?;
    // Usage counts whatever became of its report, a stale one included: the money was spent.
    let used: Vec<(&str, Option<&str>, &Usage)> =
        reports.iter().filter_map(|r| Some((r.wp_id.as_str(), r.dispatch_id.as_deref(), r.usage.as_ref()?))).collect();
    let (plans, agents) = budgets::record(&mut tx, &used).await?;
    budgets::warn(&mut tx, &routing, ctx.settings.budget_warn_ratio(), &plans, &agents).await?;
    let unblocked = store::unblocked_by(&mut tx, &changed).await?;
    // The dependents that may run at once are claimed here, so the next step of a chain waits
    // for no round; the round below gets the rest.
    let (claimed, left) = dispatch::at_once::at_completion(&mut tx, &routing, &unblocked, gate).await?;
    tracing::debug!(
        changed = ?changed,
        unblocked = ?unblocked.iter().map(|u| (u.wp_id.as_str(), u.free)).collect::<Vec<_>>(),
        left = ?left,
        claimed = claimed.len(),
        "completions applied"
    );
    // Completions come alone in their batch (their own stream), and said where they went.
    let routes = if input == Input::Completed { completed_routes } else { routes_of(&mut tx, &reported).await? };
    tx.commit().await?;
    let freed_at = chrono::Utc::now().timestamp_micros() as f64 / 1e6;

    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    // The reports are durable, so the acknowledgement and the dispatch of what they unblocked
    // go out together: the round reads nothing the acknowledgement changes (the lane gate looks
    // at the incoming stream only), and the next work package does not wait for Redis to answer.
    // The capped agents whose slots the reports freed: their targets' ready work is read next.
    // Only a capped agent's freed slot can let its ready work go: an agent without a cap has
    // no ready work waiting for a slot (what waits for it waits for a resume, a token or a
    // routing file, which the sweep sees), so its completions read no ready work at all.
    let freed: std::collections::BTreeSet<String> = routes
        .iter()
        .map(|(agent, _)| agent.clone())
        .filter(|a| routing.agents.get(a).is_some_and(|spec| spec.max_in_flight.is_some()))
        .collect();
    let ready = if freed.is_empty() { Ready::None } else { Ready::Of(freed) };
    let scope = Scope { wp_ids: left, sweep_from: None, ready };
    let dispatch = async {
        let at_once = dispatch::publish_claimed(ctx, &claimed, |_| Some(freed_at)).await?;
        Ok::<usize, anyhow::Error>(at_once + dispatch::round(ctx, &scope).await?)
    };
    let (acked, dispatched) = tokio::join!(ctx.ack(&stream, &ids, &deadletters), dispatch);
    if let Err(e) = dispatched {
        tracing::warn!(error = format!("{e:#}"), "dispatch after completions failed; the scheduler will retry");
        ctx.stats.note_error();
    }
    acked?;
    Stats::add(&ctx.stats.completed, completed);
    Stats::add(&ctx.stats.failed, failed);
    for ((_, ok), (agent, kind)) in reported.iter().zip(&routes) {
        if *ok {
            ctx.metrics.completed(agent, kind);
        } else {
            ctx.metrics.failed(agent, kind);
        }
    }
    Ok(())
}

/// (agent, route kind) of each reported work package, in the order given.
async fn routes_of(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    reported: &[(String, bool)],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    use sqlx::Row;
    if reported.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = reported.iter().map(|(w, _)| w.clone()).collect();
    let rows =
        // Key by key: a cached plan made while the table was small scanned all of it for `= ANY`.
        sqlx::query(
            "SELECT w.wp_id, coalesce(w.agent_id, '') AS agent, coalesce(w.route, '') AS route FROM unnest($1::text[]) AS k(id)
             CROSS JOIN LATERAL (SELECT x.wp_id, x.agent_id, x.route FROM work_packages x WHERE x.wp_id = k.id OFFSET 0) w",
        )
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?;
    let mut by: std::collections::HashMap<String, (String, String)> = std::collections::HashMap::new();
    for r in rows {
        by.insert(r.try_get("wp_id")?, (r.try_get("agent")?, r.try_get("route")?));
    }
    Ok(ids.iter().map(|w| by.get(w).cloned().unwrap_or_default()).collect())
}
