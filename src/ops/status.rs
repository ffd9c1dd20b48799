//! What `status` shows: counts per status, and for each work package why it waits.

use serde::Serialize;

use crate::ops::reads::WpView;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Overview {
    pub counts: Vec<(String, i64)>,
    pub work_packages: Vec<WpView>,
    pub deadletters: Option<u64>,
    /// The retention in force (v1.3), from the newest health entry of a live replica: (work
    /// packages, trigger streams).
    pub retention: Option<(String, String)>,
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
