//! Publication: the triggers of claimed dispatches go to Redis, and their outbox rows go once
//! Redis holds them. A claim whose publication was not confirmed (a crash, a stall, a trigger
//! Redis refused) keeps its outbox row and is published again by the scheduler: idempotently,
//! since the publication script adds a trigger only once per dispatch_id.

use anyhow::Context;
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::engine::context::Ctx;
use crate::engine::streams::{self, Published, Trigger};
use crate::engine::traces::Dispatch;

/// A trigger to publish, with what it is for.
pub(super) struct Outgoing {
    pub dispatch_id: String,
    pub wp_id: String,
    pub agent: String,
    pub trigger: Trigger,
    /// Its `dispatch` span, when the work carries a trace context and tracing is on (v1.6).
    pub span: Option<Dispatch>,
}

/// Builds the trigger entry of a claimed row: every incoming field, then the orchestrator's
/// own fields, which win over incoming fields of the same name.
pub(super) fn trigger_from_row(ctx: &Ctx, r: &PgRow) -> Result<Outgoing, sqlx::Error> {
    let wp_id: String = r.try_get("wp_id")?;
    let agent: String = r.try_get("agent_id")?;
    let route: String = r.try_get("route")?;
    let attempts: i32 = r.try_get("attempts")?;
    let dispatch_id: String = r.try_get("dispatch_id")?;
    let source_id: String = r.try_get("source_id")?;
    let fields: serde_json::Value = r.try_get("fields")?;
    let own = [
        ("wp_id", wp_id.clone()),
        ("agent_id", agent.clone()),
        ("route", route),
        ("attempt", attempts.to_string()),
        ("dispatch_id", dispatch_id.clone()),
        ("source_id", source_id),
    ];
    let mut out: Vec<(String, String)> = Vec::new();
    if let Some(obj) = fields.as_object() {
        for (k, v) in obj {
            if own.iter().any(|(o, _)| o == k) {
                continue;
            }
            out.push((k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())));
        }
    }
    out.extend(own.into_iter().map(|(k, v)| (k.to_string(), v)));
    add_upstream(ctx, &wp_id, r, &mut out);
    // The claim's row has the claim's time; a republication's has none.
    let claimed_at = ctx
        .traces
        .is_on()
        .then(|| r.try_get::<chrono::DateTime<chrono::Utc>, _>("dispatched_at").ok().map(std::time::SystemTime::from))
        .flatten();
    let span = ctx.traces.dispatch(
        &mut out,
        claimed_at,
        [("ge.wp_id", wp_id.as_str()), ("ge.dispatch_id", dispatch_id.as_str()), ("ge.agent_id", agent.as_str())],
    );
    tracing::info!(wp_id = %wp_id, dispatch_id = %dispatch_id, agent_id = %agent, "dispatching");
    Ok(Outgoing {
        trigger: Trigger {
            stream: ctx.settings.names.trigger_stream(&agent),
            dispatch_key: ctx.settings.names.dispatch_key(&dispatch_id),
            fields: out,
        },
        dispatch_id,
        wp_id,
        agent,
        span,
    })
}

/// (v1.6) The results of `w`'s prerequisites that waited for an approval or an event, by
/// wp_id, as a JSON object column `upstream` (NULL when there are none): read with the claim
/// and the republication, from the edges of `w` only.
macro_rules! upstream_of {
    () => {
        "(SELECT jsonb_object_agg(p.wp_id, p.result) FROM work_package_deps d
           CROSS JOIN LATERAL (SELECT x.wp_id, x.result FROM work_packages x
                               WHERE x.wp_id = d.depends_on AND x.wait_for IS NOT NULL AND x.result IS NOT NULL OFFSET 0) p
           WHERE d.wp_id = w.wp_id) AS upstream"
    };
}
pub(super) use upstream_of;

/// (v1.6) The results of the prerequisites that waited for an approval or an event, as
/// `upstream.{wp_id}` fields (the claim reads them, `upstream_of!`). Bounded: no more of them
/// than `GE_MAX_FIELDS` allows beside the entry's own, and at most `GE_MAX_PAYLOAD_BYTES`
/// together; what does not fit is left out and logged.
fn add_upstream(ctx: &Ctx, wp_id: &str, r: &PgRow, out: &mut Vec<(String, String)>) {
    let Ok(Some(serde_json::Value::Object(up))) = r.try_get::<Option<serde_json::Value>, _>("upstream") else { return };
    let mut room = ctx.settings.limits.max_payload_bytes;
    for (prereq, result) in up {
        let value = result.as_str().map(str::to_string).unwrap_or_else(|| result.to_string());
        let name = format!("upstream.{prereq}");
        if out.len() >= ctx.settings.limits.max_fields + 6 || value.len() > room || out.iter().any(|(k, _)| *k == name) {
            tracing::warn!(wp_id = %wp_id, prerequisite = %prereq, "the result of a prerequisite does not fit in the trigger; left out");
            continue;
        }
        room -= value.len();
        out.push((name, value));
    }
}

/// The `wait` spans of traced claims: from when each could run (`since`, by wp_id) to its claim.
pub(super) fn waited(ctx: &Ctx, outgoing: &[Outgoing], since: &impl Fn(&str) -> Option<f64>) {
    for o in outgoing {
        if let (Some(span), Some(s)) = (&o.span, since(o.wp_id.as_str())) {
            span.waited(&ctx.traces, s);
        }
    }
}

/// Publishes the triggers and forgets the outbox rows of those Redis now holds. Those Redis
/// refused stay in the outbox; their work packages say why, the log and a metric count them.
/// Returns how many Redis holds.
pub(super) async fn publish(ctx: &Ctx, outgoing: Vec<Outgoing>) -> anyhow::Result<usize> {
    if outgoing.is_empty() {
        return Ok(0);
    }
    let triggers: Vec<Trigger> = outgoing.iter().map(|o| o.trigger.clone()).collect();
    let mut redis = ctx.redis.clone();
    let outcomes =
        streams::publish_triggers(&mut redis, &triggers, ctx.settings.dispatch_key_lifetime()).await.context("publishing triggers")?;
    let mut held = Vec::new();
    let (mut refused, mut refused_wp, mut refused_why) = (Vec::new(), Vec::new(), Vec::new());
    for (mut o, outcome) in outgoing.into_iter().zip(outcomes) {
        let span = o.span.take();
        match outcome {
            Published::New | Published::Already => {
                if let Some(s) = span {
                    s.end(None);
                }
                held.push(o.dispatch_id.clone())
            }
            Published::Refused(e) => {
                if let Some(s) = span {
                    s.end(Some(&e));
                }
                tracing::warn!(wp_id = %o.wp_id, dispatch_id = %o.dispatch_id, stream = %o.trigger.stream, error = %e,
                    "Redis refused the trigger; it is published again later");
                ctx.metrics.publish_refused(&o.agent);
                ctx.stats.note_error();
                refused.push(o.dispatch_id.clone());
                refused_wp.push(o.wp_id.clone());
                refused_why.push(format!(
                    "dispatched, but Redis refused its trigger on {}: {}; published again every {}s until Redis takes it",
                    o.trigger.stream,
                    crate::core::entry::excerpt(&e),
                    ctx.settings.republish_after.as_secs()
                ));
            }
        }
    }
    forget_claims(ctx, &held).await.context("recording published triggers")?;
    if !refused.is_empty() {
        // To the back of the republication queue, so that refused triggers never crowd out
        // the claims of other agents.
        sqlx::query("UPDATE dispatch_outbox SET claimed_at = now() WHERE dispatch_id = ANY($1)")
            .bind(&refused)
            .execute(&ctx.pool)
            .await
            .context("recording refused triggers")?;
        sqlx::query(
            "UPDATE work_packages w SET wait_reason = r.why FROM unnest($1::text[], $2::text[]) AS r(wp_id, why)
             WHERE w.wp_id = r.wp_id AND w.status COLLATE \"C\" = 'dispatched' AND w.wait_reason IS DISTINCT FROM r.why",
        )
        .bind(&refused_wp)
        .bind(&refused_why)
        .execute(&ctx.pool)
        .await
        .context("recording refused triggers")?;
    }
    Ok(held.len())
}

/// Removes claims from the outbox: their triggers are published, or no longer needed.
async fn forget_claims(ctx: &Ctx, dispatch_ids: &[String]) -> Result<(), sqlx::Error> {
    if dispatch_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM dispatch_outbox WHERE dispatch_id = ANY($1)").bind(dispatch_ids).execute(&ctx.pool).await?;
    Ok(())
}

/// Publishes claims that no replica confirmed (it crashed or stalled between the claim and the
/// publication, or Redis refused the trigger). Idempotent: a trigger already in Redis is not
/// added again.
pub(crate) async fn republish_stale(ctx: &Ctx) -> anyhow::Result<usize> {
    let rows = sqlx::query(concat!(
        "SELECT o.dispatch_id AS claimed, w.status = 'dispatched' AND w.dispatch_id = o.dispatch_id AS current,
                w.wp_id, w.agent_id, w.route, w.attempts, w.dispatch_id, w.fields, w.source_id, ",
        upstream_of!(),
        "
         FROM dispatch_outbox o LEFT JOIN work_packages w ON w.wp_id = o.wp_id
         WHERE o.claimed_at < now() - make_interval(secs => $1::float8)
         ORDER BY o.claimed_at LIMIT 500"
    ))
    .bind(ctx.settings.republish_after.as_secs_f64())
    .fetch_all(&ctx.pool)
    .await?;
    // A claim whose work package has moved on (reported on, retried, cancelled) needs no
    // trigger any more; its outbox row goes.
    let mut gone = Vec::new();
    let mut outgoing = Vec::new();
    for r in &rows {
        if r.try_get::<Option<bool>, _>("current")? == Some(true) {
            outgoing.push(trigger_from_row(ctx, r)?);
        } else {
            gone.push(r.try_get::<String, _>("claimed")?);
        }
    }
    forget_claims(ctx, &gone).await?;
    let n = outgoing.len();
    if n > 0 {
        tracing::warn!(count = n, "publishing dispatches whose publication was not confirmed");
    }
    publish(ctx, outgoing).await?;
    Ok(n)
}
