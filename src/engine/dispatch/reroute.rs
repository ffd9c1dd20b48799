//! Routing open work again under a new routing file. A work package is routed once, when it
//! arrives; the routing file's version goes with the answer. When the version in force changes
//! (or at start, for rows stored before targets existed), open work routed under another
//! version is routed again, a page at a time in incoming order, so that rounds read it under
//! its new target. A round that meets such work before this pass does routes it itself.

use sqlx::Row;

use crate::core::router::{self, RouteRequest};
use crate::engine::context::Ctx;

const PAGE: i64 = 1000;

/// Routes every open, not yet dispatched work package whose route came from another routing
/// file than the one in force, unless this replica did so for this version already. Returns
/// how many it routed again.
pub(crate) async fn reroute_open_work(ctx: &Ctx) -> anyhow::Result<u64> {
    let routing = ctx.routing.get();
    let version = routing.config_version.clone();
    if ctx.rerouted_for.lock().unwrap_or_else(|p| p.into_inner()).as_deref() == Some(version.as_str()) {
        return Ok(0);
    }
    let mut total = 0;
    for status in ["blocked", "ready", "retry_wait"] {
        let mut from = (i64::MIN, i64::MIN);
        loop {
            let rows = sqlx::query(
                "SELECT wp_id, requested_agent, work_type, trigger_subject, routed_by, source_ms, source_seq FROM work_packages
                 WHERE status = $1 AND (source_ms, source_seq) > ($2, $3) ORDER BY source_ms, source_seq LIMIT $4",
            )
            .bind(status)
            .bind(from.0)
            .bind(from.1)
            .bind(PAGE)
            .fetch_all(&ctx.pool)
            .await?;
            let Some(last) = rows.last() else { break };
            from = (last.try_get("source_ms")?, last.try_get("source_seq")?);
            let (mut ids, mut targets) = (Vec::new(), Vec::new());
            for r in &rows {
                if r.try_get::<Option<String>, _>("routed_by")?.as_deref() == Some(version.as_str()) {
                    continue;
                }
                let (agent, work_type, trigger): (Option<String>, Option<String>, Option<String>) =
                    (r.try_get("requested_agent")?, r.try_get("work_type")?, r.try_get("trigger_subject")?);
                let req = RouteRequest { agent_id: agent.as_deref(), work_type: work_type.as_deref(), trigger: trigger.as_deref() };
                ids.push(r.try_get::<String, _>("wp_id")?);
                // No route now (its agent left the routing file): no target, so no round reads it
                // as ready work until a routing file routes it again; rounds that meet it say why.
                targets.push(router::resolve(&req, &routing).ok().map(|t| t.key()));
            }
            if !ids.is_empty() {
                let n = sqlx::query(
                    "UPDATE work_packages w SET target = r.target, routed_by = $3
                     FROM unnest($1::text[], $2::text[]) AS r(wp_id, target)
                     WHERE w.wp_id = r.wp_id AND w.status COLLATE \"C\" IN ('blocked', 'ready', 'retry_wait')
                       AND w.routed_by IS DISTINCT FROM $3",
                )
                .bind(&ids)
                .bind(&targets)
                .bind(&version)
                .execute(&ctx.pool)
                .await?
                .rows_affected();
                total += n;
            }
            if (rows.len() as i64) < PAGE {
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(count = total, config_version = %version, "open work routed again under a new routing file");
    }
    *ctx.rerouted_for.lock().unwrap_or_else(|p| p.into_inner()) = Some(version);
    Ok(total)
}
