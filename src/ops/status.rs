//! What `status` shows: counts per status, and for each work package why it waits.

use serde::Serialize;

use crate::engine::schedule_store::ScheduleView;
use crate::ops::reads::WpView;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Overview {
    pub counts: Vec<(String, i64)>,
    pub work_packages: Vec<WpView>,
    pub deadletters: Option<u64>,
    /// The retention in force (v1.3), from the newest health entry of a live replica: (work
    /// packages, trigger streams).
    pub retention: Option<(String, String)>,
    /// Every schedule with its next firing (v1.6).
    pub schedules: Vec<ScheduleView>,
    /// (v1.6) Spend per agent and plan, and the budgets.
    pub spend: Option<crate::engine::budgets::Overview>,
}

pub(crate) fn render(o: &Overview) -> String {
    let mut out = String::new();
    let counts: Vec<String> = o.counts.iter().map(|(s, n)| format!("{s}={n}")).collect();
    out.push_str(&format!("work packages: {}\n", if counts.is_empty() { "none".into() } else { counts.join("  ") }));
    if let Some(d) = o.deadletters {
        out.push_str(&format!("dead letters: {d}\n"));
    }
    if let Some((wps, triggers)) = &o.retention {
        out.push_str(&format!("retention: finished work packages kept {wps}; trigger streams: {triggers}\n"));
    }
    if !o.schedules.is_empty() {
        out.push('\n');
        out.push_str(&render_schedules(&o.schedules));
    }
    if let Some(s) = &o.spend {
        out.push_str(&render_spend(s));
    }
    if !o.work_packages.is_empty() {
        let w = o.work_packages.iter().map(|v| v.wp_id.len()).max().unwrap_or(5).max(5);
        out.push_str(&format!("\n{:<w$}  {:<10}  {:<10}  {:<10}  {}\n", "WP", "STATUS", "AGENT", "LANE", "WHY"));
        for v in &o.work_packages {
            out.push_str(&format!(
                "{:<w$}  {:<10}  {:<10}  {:<10}  {}\n",
                v.wp_id,
                v.status,
                v.agent_id.as_deref().unwrap_or("-"),
                v.lane.as_deref().unwrap_or("-"),
                v.why
            ));
        }
    }
    out
}

pub(crate) fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_else(|| "-".into())
}

/// One line per schedule (v1.6), for `schedule list` and `status`.
pub(crate) fn render_schedules(all: &[ScheduleView]) -> String {
    let mut out = String::new();
    let w = all.iter().map(|s| s.name.len()).max().unwrap_or(8).max(8);
    out.push_str(&format!(
        "{:<w$}  {:<20}  {:<16}  {:<20}  {:<20}  {}\n",
        "SCHEDULE", "CRON", "TIME ZONE", "NEXT FIRING", "LAST FIRING", "POLICIES"
    ));
    for s in all {
        let next = if s.paused { "paused".into() } else { time(s.next_firing) };
        let last = match (&s.last_firing, &s.last_outcome) {
            (Some(t), Some(o)) if o != "submitted" => format!("{} ({o})", time(Some(*t))),
            (t, _) => time(*t),
        };
        out.push_str(&format!(
            "{:<w$}  {:<20}  {:<16}  {:<20}  {:<20}  missed={} overlap={} plan={}\n",
            s.name, s.cron, s.timezone, next, last, s.missed, s.overlap, s.plan_source
        ));
    }
    out
}

/// (v1.6) Spend per agent and plan in USD, and each budget with what is spent of it.
pub(crate) fn render_spend(s: &crate::engine::budgets::Overview) -> String {
    let mut out = String::new();
    let line = |t: &crate::engine::budgets::Total| {
        format!("{} USD (today {}), {} in / {} out tokens, {} reports", t.cost, t.cost_today, t.input_tokens, t.output_tokens, t.reports)
    };
    if s.agents.iter().any(|t| t.reports > 0) || s.plans.iter().any(|t| t.reports > 0) || !s.budgets.is_empty() {
        out.push_str("\nspend (USD):\n");
    }
    for t in s.agents.iter().filter(|t| t.reports > 0) {
        out.push_str(&format!("  agent {:<20} {}\n", t.name, line(t)));
    }
    for t in &s.plans {
        out.push_str(&format!("  plan  {:<20} {}\n", t.name, line(t)));
    }
    for b in &s.budgets {
        let per = if b.scope == "agent" { format!(" per {}", b.period) } else { String::new() };
        let state = if b.reached {
            "  REACHED: its work waits".to_string()
        } else if b.warning {
            format!("  warning: past {:.0} %", s.warn_at * 100.0)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  budget of {} {}: {} of {} USD{per}{state}\n",
            b.scope,
            b.name,
            b.spent,
            b.limit.as_deref().unwrap_or("-")
        ));
    }
    out
}
