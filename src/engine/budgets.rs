//! Usage and budgets (contract v1.6): the usage reports carry, stored per dispatch and summed
//! per plan, agent and fairness key and UTC day (tables `dispatch_usage`, `spend_totals`); the
//! budgets of plans (`plan_budgets`) and of agents (the routing file), which hold work the way
//! a pause does; the warnings at a threshold (`budget_warnings`). Amounts are NUMERIC in
//! PostgreSQL and text in Rust: nothing here adds money up in floating point.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::core::routing_file::RoutingTable;
use crate::core::usage::Usage;

/// Namespace of the per-plan budget locks (`pg_advisory_xact_lock(BUDGET_LOCKS, hashtext(plan))`):
/// a round that holds a plan's work for its budget and an operator who changes that budget
/// take it, so a change is never overtaken by a hold decided on the old budget.
const BUDGET_LOCKS: i32 = 0x6762;

/// Today and the first day of this month, UTC, by the database's clock.
macro_rules! today {
    () => {
        "(now() AT TIME ZONE 'UTC')::date"
    };
}
macro_rules! period_start {
    ($period:expr) => {
        concat!(
            "CASE ",
            $period,
            " WHEN 'day' THEN ",
            $crate::engine::budgets::today!(),
            " ELSE date_trunc('month', now() AT TIME ZONE 'UTC')::date END"
        )
    };
}
pub(crate) use {period_start, today};

/// Records the usage of a batch of reports in one statement, in the transaction that applies
/// them: a row per dispatch (the report's `dispatch_id`, else the work package's current one;
/// the first report of a dispatch counts, a repeated one adds nothing), and its cost and tokens
/// added to the day's totals of its plan, agent and fairness key. A report for an older
/// attempt counts too: the money was spent. Returns the plans and agents whose spend grew.
pub(crate) async fn record(
    tx: &mut Transaction<'_, Postgres>,
    usage: &[(&str, Option<&str>, &Usage)],
) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    if usage.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let rows = sqlx::query(concat!(
        "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[])
                                 WITH ORDINALITY AS u(wp_id, dispatch_id, input_tokens, output_tokens, cost, model, i)),
              j AS (SELECT DISTINCT ON (coalesce(u.dispatch_id, w.dispatch_id)) coalesce(u.dispatch_id, w.dispatch_id) AS dispatch_id,
                           w.wp_id, w.plan, coalesce(w.agent_id, '') AS agent_id, w.fairness_key, u.input_tokens, u.output_tokens,
                           coalesce(u.cost::numeric, 0) AS cost, u.model
                    FROM u CROSS JOIN LATERAL (SELECT x.wp_id, x.plan, x.agent_id, x.fairness_key, x.dispatch_id
                                               FROM work_packages x WHERE x.wp_id = u.wp_id OFFSET 0) w
                    WHERE coalesce(u.dispatch_id, w.dispatch_id) IS NOT NULL
                    ORDER BY coalesce(u.dispatch_id, w.dispatch_id), u.i),
              ins AS (INSERT INTO dispatch_usage (dispatch_id, wp_id, plan, agent_id, fairness_key, input_tokens, output_tokens, cost, model)
                      SELECT dispatch_id, wp_id, plan, agent_id, fairness_key, input_tokens, output_tokens, cost, model FROM j
                      ON CONFLICT (dispatch_id) DO NOTHING
                      RETURNING plan, agent_id, fairness_key, input_tokens, output_tokens, cost),
              sums AS (SELECT s.scope, s.name, sum(ins.cost) AS cost, coalesce(sum(ins.input_tokens), 0) AS input_tokens,
                              coalesce(sum(ins.output_tokens), 0) AS output_tokens, count(*) AS reports
                       FROM ins CROSS JOIN LATERAL (VALUES ('plan', ins.plan), ('agent', ins.agent_id), ('fairness_key', ins.fairness_key)) s(scope, name)
                       WHERE s.name IS NOT NULL AND s.name <> ''
                       GROUP BY s.scope, s.name ORDER BY s.scope, s.name),
              tot AS (INSERT INTO spend_totals AS t (scope, name, day, cost, input_tokens, output_tokens, reports)
                      SELECT scope, name, ",
        today!(),
        ", cost, input_tokens, output_tokens, reports FROM sums
                      ON CONFLICT (scope, name, day) DO UPDATE SET cost = t.cost + excluded.cost,
                             input_tokens = t.input_tokens + excluded.input_tokens,
                             output_tokens = t.output_tokens + excluded.output_tokens, reports = t.reports + excluded.reports)
         SELECT scope, name FROM sums WHERE scope IN ('plan', 'agent') AND cost > 0"
    ))
    .bind(usage.iter().map(|u| u.0).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.1).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.2.input_tokens).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.2.output_tokens).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.2.cost.as_deref()).collect::<Vec<_>>())
    .bind(usage.iter().map(|u| u.2.model.as_deref()).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    let (mut plans, mut agents) = (Vec::new(), Vec::new());
    for r in rows {
        let (scope, name): (String, String) = (r.try_get("scope")?, r.try_get("name")?);
        if scope == "plan" { plans.push(name) } else { agents.push(name) }
    }
    Ok((plans, agents))
}

/// The agents of the routing file with a budget, as three parallel columns for SQL.
pub(crate) fn agent_budget_columns(routing: &RoutingTable) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
    let mut cols = (Vec::new(), Vec::new(), Vec::new());
    for (name, spec) in &routing.agents {
        if let Some(b) = &spec.budget {
            cols.0.push(name.as_str());
            cols.1.push(b.usd.as_str());
            cols.2.push(b.period.as_str());
        }
    }
    cols
}

/// An agent's or a plan's spend against its budget.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spend {
    pub scope: String,
    pub name: String,
    /// USD, exact decimal text.
    pub spent: String,
    pub limit: Option<String>,
    /// `day` or `month` for an agent's budget; `plan` for a plan's (its whole life).
    pub period: String,
    pub reached: bool,
    /// At or past the warning threshold.
    pub warning: bool,
}

impl Spend {
    /// Why work waits for it: `budget of plan nightly reached: 25.03 of 25.00 USD`.
    pub(crate) fn wait_reason(&self) -> String {
        let per = if self.scope == "agent" { format!(" per {}", self.period) } else { String::new() };
        format!("budget of {} {} reached: {} of {} USD{per}", self.scope, self.name, self.spent, self.limit.as_deref().unwrap_or("?"))
    }

    fn from_row(r: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Spend {
            scope: r.try_get("scope")?,
            name: r.try_get("name")?,
            spent: r.try_get("spent")?,
            limit: r.try_get("lim")?,
            period: r.try_get("period")?,
            reached: r.try_get("reached")?,
            warning: r.try_get("warning")?,
        })
    }
}

/// The spend of every agent of `routing` with a budget, in its current period.
pub async fn agents<'e>(db: impl sqlx::PgExecutor<'e>, routing: &RoutingTable, warn_at: f64) -> Result<Vec<Spend>, sqlx::Error> {
    let (names, limits, periods) = agent_budget_columns(routing);
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(concat!(
        "SELECT 'agent' AS scope, g.agent AS name, ge_usd(g.lim::numeric) AS lim, g.period, ge_usd(coalesce(sum(s.cost), 0)) AS spent,
                coalesce(sum(s.cost), 0) >= g.lim::numeric AS reached, coalesce(sum(s.cost), 0) >= g.lim::numeric * $4::float8::numeric AS warning
         FROM unnest($1::text[], $2::text[], $3::text[]) AS g(agent, lim, period)
         LEFT JOIN spend_totals s ON s.scope = 'agent' AND s.name = g.agent AND s.day >= ",
        period_start!("g.period"),
        " GROUP BY g.agent, g.lim, g.period ORDER BY g.agent"
    ))
    .bind(&names)
    .bind(&limits)
    .bind(&periods)
    .bind(warn_at)
    .fetch_all(db)
    .await?;
    rows.iter().map(Spend::from_row).collect()
}

/// Why each agent whose budget is reached takes no work now.
pub(crate) async fn agents_held<'e>(db: impl sqlx::PgExecutor<'e>, routing: &RoutingTable) -> Result<HashMap<String, String>, sqlx::Error> {
    Ok(agents(db, routing, 1.0).await?.into_iter().filter(|s| s.reached).map(|s| (s.name.clone(), s.wait_reason())).collect())
}

/// Whether any plan has a budget, as a replica last saw it: while none has (checked again at
/// most every `RECHECK`), rounds skip the statement that locks and reads plans' budgets. Safe
/// to be stale: the claim itself checks every plan's budget, so a stale "none" only leaves a
/// held plan's work unmarked (read again, and refused by the claim) for that long. A budget set
/// through this replica is seen at once.
#[derive(Debug, Default)]
pub struct PlanBudgetsSeen(std::sync::Mutex<Option<std::time::Instant>>);

impl PlanBudgetsSeen {
    const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

    fn none_lately(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|at| at.elapsed() < Self::RECHECK)
    }

    fn set_none(&self, none: bool) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = none.then(std::time::Instant::now);
    }

    /// A budget was set: look again at the next round.
    pub(crate) fn forget(&self) {
        self.set_none(false);
    }
}

/// In a claim's transaction: takes the budget locks of those of `plans` that have a budget (in
/// name order), then reads their spend; returns why each plan whose budget is reached waits.
pub(crate) async fn plans_held(
    tx: &mut Transaction<'_, Postgres>,
    plans: &[String],
    seen: &PlanBudgetsSeen,
) -> Result<HashMap<String, String>, sqlx::Error> {
    if plans.is_empty() || seen.none_lately() {
        return Ok(HashMap::new());
    }
    // A row without a plan says that no plan has a budget at all.
    let locked: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT s.plan, pg_advisory_xact_lock($1, hashtext(s.plan))::text
         FROM (SELECT b.plan FROM plan_budgets b WHERE b.plan = ANY($2) AND b.limit_usd IS NOT NULL ORDER BY b.plan) s
         UNION ALL SELECT NULL, NULL WHERE NOT EXISTS (SELECT 1 FROM plan_budgets b WHERE b.limit_usd IS NOT NULL)",
    )
    .bind(BUDGET_LOCKS)
    .bind(plans)
    .fetch_all(&mut **tx)
    .await?;
    seen.set_none(locked.iter().any(|(p, _)| p.is_none()));
    let locked: Vec<String> = locked.into_iter().filter_map(|(p, _)| p).collect();
    if locked.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(plan_spend(&mut **tx, &locked, 1.0).await?.into_iter().filter(|s| s.reached).map(|s| (s.name.clone(), s.wait_reason())).collect())
}

/// The spend of `plans` (all plans with a budget or a spend when None, the largest spenders
/// first, at most `limit`).
async fn plan_spend<'e>(db: impl sqlx::PgExecutor<'e>, plans: &[String], warn_at: f64) -> Result<Vec<Spend>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT 'plan' AS scope, b.plan AS name, ge_usd(b.limit_usd) AS lim, 'plan' AS period,
                ge_usd(coalesce(sum(s.cost), 0)) AS spent, coalesce(sum(s.cost), 0) >= b.limit_usd AS reached,
                coalesce(sum(s.cost), 0) >= b.limit_usd * $2::float8::numeric AS warning
         FROM plan_budgets b LEFT JOIN spend_totals s ON s.scope = 'plan' AND s.name = b.plan
         WHERE b.plan = ANY($1) AND b.limit_usd IS NOT NULL GROUP BY b.plan, b.limit_usd ORDER BY b.plan",
    )
    .bind(plans)
    .bind(warn_at)
    .fetch_all(db)
    .await?;
    rows.iter().map(Spend::from_row).collect()
}

/// The budgets entries carry (`budget` on a plan's entries): the first one of a plan sets it;
/// later ones, and entries of a plan an operator has given a budget, change nothing.
pub(crate) async fn set_from_entries(pool: &PgPool, budgets: &[(String, String)]) -> Result<(), sqlx::Error> {
    if budgets.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO plan_budgets (plan, limit_usd, set_by)
         SELECT DISTINCT ON (p) p, l::numeric, 'entry' FROM unnest($1::text[], $2::text[]) AS b(p, l) ORDER BY p
         ON CONFLICT (plan) DO NOTHING",
    )
    .bind(budgets.iter().map(|b| b.0.as_str()).collect::<Vec<_>>())
    .bind(budgets.iter().map(|b| b.1.as_str()).collect::<Vec<_>>())
    .execute(pool)
    .await?;
    Ok(())
}

/// An operator sets a plan's budget (`usd`) or removes it (None: the plan has no budget from
/// then on, whatever budget its later entries carry). Under the plan's budget lock,
/// in one transaction: the budget, its warnings forgotten (the next crossing is logged again),
/// and, when the budget no longer holds the plan, its held work back among the ready work that
/// rounds read. Returns the plan's spend against its budget now (None: removed).
pub async fn set_plan(pool: &PgPool, plan: &str, usd: Option<&str>) -> Result<Option<Spend>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))").bind(BUDGET_LOCKS).bind(plan).execute(&mut *tx).await?;
    match usd {
        Some(usd) => {
            sqlx::query(
                "INSERT INTO plan_budgets (plan, limit_usd, set_by) VALUES ($1, $2::numeric, 'operator')
                 ON CONFLICT (plan) DO UPDATE SET limit_usd = excluded.limit_usd, set_by = excluded.set_by, set_at = now()",
            )
            .bind(plan)
            .bind(usd)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            // Kept as a row without a limit, so that later entries of the plan that carry a
            // `budget` do not set one again.
            sqlx::query(
                "INSERT INTO plan_budgets (plan, limit_usd, set_by) VALUES ($1, NULL, 'operator')
                 ON CONFLICT (plan) DO UPDATE SET limit_usd = NULL, set_by = excluded.set_by, set_at = now()",
            )
            .bind(plan)
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::query("DELETE FROM budget_warnings WHERE scope = 'plan' AND name = $1").bind(plan).execute(&mut *tx).await?;
    let now = plan_spend(&mut *tx, &[plan.to_string()], 1.0).await?.into_iter().next();
    if !now.as_ref().is_some_and(|s| s.reached) {
        sqlx::query("UPDATE work_packages SET held_by = NULL WHERE held_by = $1").bind(held_by(plan)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(now)
}

/// The mark of work a plan's budget holds (see `work_packages.held_by`).
pub(crate) fn held_by(plan: &str) -> String {
    format!("budget:{plan}")
}

/// After usage was recorded: a warning in the log, once per crossing across replicas, for each
/// plan and agent of `plans`/`agents` whose spend reached `warn_at` of its budget, and again
/// when it reached the budget.
pub(crate) async fn warn(
    tx: &mut Transaction<'_, Postgres>,
    routing: &RoutingTable,
    warn_at: f64,
    plans: &[String],
    agents_: &[String],
) -> Result<(), sqlx::Error> {
    let mut spends = if plans.is_empty() { Vec::new() } else { plan_spend(&mut **tx, plans, warn_at).await? };
    if !agents_.is_empty() {
        spends.extend(agents(&mut **tx, routing, warn_at).await?.into_iter().filter(|s| agents_.contains(&s.name)));
    }
    let crossed: Vec<&Spend> = spends.iter().filter(|s| s.warning).collect();
    if crossed.is_empty() {
        return Ok(());
    }
    let level = |s: &Spend| if s.reached { "reached" } else { "warning" };
    let new: Vec<(String, String, String)> = sqlx::query_as(concat!(
        "INSERT INTO budget_warnings (scope, name, period, level)
         SELECT w.scope, w.name, CASE w.period WHEN 'day' THEN ",
        today!(),
        "::text WHEN 'month' THEN to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM') ELSE '' END, w.level
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS w(scope, name, period, level)
         ON CONFLICT DO NOTHING RETURNING scope, name, level"
    ))
    .bind(crossed.iter().map(|s| s.scope.as_str()).collect::<Vec<_>>())
    .bind(crossed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>())
    .bind(crossed.iter().map(|s| s.period.as_str()).collect::<Vec<_>>())
    .bind(crossed.iter().map(|s| level(s)).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    for (scope, name, lvl) in new {
        let Some(s) = crossed.iter().find(|s| s.scope == scope && s.name == name) else { continue };
        let limit = s.limit.as_deref().unwrap_or("?");
        if lvl == "reached" && scope == "agent" {
            say_why_agent_waits(tx, &name, &s.wait_reason()).await?;
        }
        if lvl == "reached" {
            tracing::warn!(scope = %scope, name = %name, spent = %s.spent, limit = %limit, "{}; no more of its work is dispatched", s.wait_reason());
        } else {
            tracing::warn!(scope = %scope, name = %name, spent = %s.spent, limit = %limit, threshold = warn_at,
                "budget of {scope} {name} nearly spent: {} of {limit} USD", s.spent);
        }
    }
    Ok(())
}

/// The ready work routed to `agent` alone says why it waits now, once, when its budget is
/// reached: no round reads that work again until the budget lets the agent take some, so it
/// would otherwise keep the reason it was last given (say, that the agent was full). Work of a
/// role keeps its reason: another agent of the role may take it.
async fn say_why_agent_waits(tx: &mut Transaction<'_, Postgres>, agent: &str, reason: &str) -> Result<(), sqlx::Error> {
    let targets: Vec<String> = ["explicit", "default", "trigger"].iter().map(|k| format!("{k}/agent:{agent}")).collect();
    sqlx::query(
        "UPDATE work_packages SET wait_reason = $2
         WHERE status = 'ready' AND held_by IS NULL AND target = ANY($1) AND wait_reason IS DISTINCT FROM $2",
    )
    .bind(&targets)
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Spend of one plan, agent or fairness key, all time and today.
#[derive(Debug, Clone, Serialize)]
pub struct Total {
    pub name: String,
    pub cost: String,
    pub cost_today: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub reports: i64,
}

/// What operators see (`status`, `GET /api/spend`, the dashboard).
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// Agents of the routing file, all of them, in name order (without one: those that spent
    /// most, at most `limit`).
    pub agents: Vec<Total>,
    /// The plans that spent most, at most `limit`, largest first.
    pub plans: Vec<Total>,
    /// Every budget: agents' in their current period, plans' (at most `limit`, those nearest
    /// to their budget first).
    pub budgets: Vec<Spend>,
    pub warn_at: f64,
}

/// The operators' read of spend and budgets. Bounded: agents of the routing file, `limit` plans.
pub async fn overview(pool: &PgPool, routing: Option<&RoutingTable>, warn_at: f64, limit: i64) -> Result<Overview, sqlx::Error> {
    let totals = |scope: &'static str| {
        sqlx::query(concat!(
            "SELECT name, ge_usd(sum(cost)) AS cost,
                    ge_usd(coalesce(sum(cost) FILTER (WHERE day = ",
            today!(),
            "), 0)) AS cost_today,
                    sum(input_tokens)::int8 AS input_tokens, sum(output_tokens)::int8 AS output_tokens, sum(reports)::int8 AS reports
             FROM spend_totals WHERE scope = $1 AND (cardinality($3::text[]) = 0 OR name = ANY($3))
             GROUP BY name ORDER BY sum(cost) DESC, name LIMIT $2"
        ))
        .bind(scope)
    };
    let row = |r: &sqlx::postgres::PgRow| -> Result<Total, sqlx::Error> {
        Ok(Total {
            name: r.try_get("name")?,
            cost: r.try_get("cost")?,
            cost_today: r.try_get("cost_today")?,
            input_tokens: r.try_get("input_tokens")?,
            output_tokens: r.try_get("output_tokens")?,
            reports: r.try_get("reports")?,
        })
    };
    // With a routing file, its agents, every one; without, those that spent most.
    let names: Vec<&str> = routing.map(|r| r.agents.keys().map(String::as_str).collect()).unwrap_or_default();
    let spent: Vec<Total> = totals("agent")
        .bind(if names.is_empty() { limit } else { names.len() as i64 })
        .bind(&names)
        .fetch_all(pool)
        .await?
        .iter()
        .map(row)
        .collect::<Result<_, _>>()?;
    let agents_ = if names.is_empty() {
        spent
    } else {
        let by: HashMap<&str, &Total> = spent.iter().map(|t| (t.name.as_str(), t)).collect();
        names
            .iter()
            .map(|n| {
                by.get(n).map(|t| (*t).clone()).unwrap_or(Total {
                    name: n.to_string(),
                    cost: "0.00".into(),
                    cost_today: "0.00".into(),
                    input_tokens: 0,
                    output_tokens: 0,
                    reports: 0,
                })
            })
            .collect()
    };
    let plans = totals("plan").bind(limit).bind(Vec::<String>::new()).fetch_all(pool).await?.iter().map(row).collect::<Result<_, _>>()?;
    let mut budgets = match routing {
        Some(r) => agents(pool, r, warn_at).await?,
        None => Vec::new(),
    };
    let rows = sqlx::query(
        "SELECT 'plan' AS scope, b.plan AS name, ge_usd(b.limit_usd) AS lim, 'plan' AS period,
                ge_usd(coalesce(s.cost, 0)) AS spent, coalesce(s.cost, 0) >= b.limit_usd AS reached,
                coalesce(s.cost, 0) >= b.limit_usd * $2::float8::numeric AS warning
         FROM plan_budgets b
         LEFT JOIN LATERAL (SELECT sum(t.cost) AS cost FROM spend_totals t WHERE t.scope = 'plan' AND t.name = b.plan) s ON true
         WHERE b.limit_usd IS NOT NULL
         ORDER BY coalesce(s.cost, 0) / nullif(b.limit_usd, 0) DESC NULLS FIRST, b.plan LIMIT $1",
    )
    .bind(limit)
    .bind(warn_at)
    .fetch_all(pool)
    .await?;
    budgets.extend(rows.iter().map(Spend::from_row).collect::<Result<Vec<_>, _>>()?);
    Ok(Overview { agents: agents_, plans, budgets, warn_at })
}

/// How many plans with a budget are below the warning, at it, or at their budget (for the
/// metrics: plans are unbounded, so they are counted, not labelled).
pub async fn plan_states(pool: &PgPool, warn_at: f64) -> Result<[(&'static str, i64); 3], sqlx::Error> {
    let (ok, warning, reached): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s < l * $1::float8::numeric), count(*) FILTER (WHERE s >= l * $1::float8::numeric AND s < l),
                count(*) FILTER (WHERE s >= l)
         FROM (SELECT b.limit_usd AS l, coalesce((SELECT sum(t.cost) FROM spend_totals t WHERE t.scope = 'plan' AND t.name = b.plan), 0) AS s
               FROM plan_budgets b WHERE b.limit_usd IS NOT NULL) x",
    )
    .bind(warn_at)
    .fetch_one(pool)
    .await?;
    Ok([("below", ok), ("warning", warning), ("reached", reached)])
}
