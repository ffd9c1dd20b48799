//! The soak's figures: the samples, whether each resource reached a plateau, the table of
//! SOAK.md and its plot, an SVG written by hand.

use std::fmt::Write as _;

use serde::Serialize;

/// One sample of the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    pub t_s: f64,
    pub completed: u64,
    pub wp_per_s: f64,
    pub redis_mb: f64,
    pub db_mb: f64,
    pub rss_mb: Vec<f64>,
    pub work_package_rows: i64,
    pub stream_entries: u64,
    pub incoming_lag: u64,
}

/// Whether a series kept within ±`tolerance` of its mean over the last third of the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plateau {
    pub series: String,
    pub mean: f64,
    /// Largest distance from the mean in the last third, in percent of the mean.
    pub max_deviation_pct: f64,
    pub held: bool,
}

pub(crate) fn plateau(series: &str, values: &[f64], tolerance_pct: f64) -> Plateau {
    let last = &values[values.len() - values.len() / 3..];
    let last = if last.is_empty() { values } else { last };
    let mean = last.iter().sum::<f64>() / last.len().max(1) as f64;
    let dev = last.iter().map(|v| (v - mean).abs()).fold(0.0, f64::max);
    let pct = if mean > 0.0 { dev / mean * 100.0 } else { 0.0 };
    Plateau { series: series.into(), mean, max_deviation_pct: pct, held: pct <= tolerance_pct }
}

/// Mean throughput of the first and the last third of the load.
pub(crate) fn throughput_thirds(load: &[Sample]) -> (f64, f64) {
    let third = (load.len() / 3).max(1);
    let mean = |s: &[Sample]| s.iter().map(|x| x.wp_per_s).sum::<f64>() / s.len().max(1) as f64;
    (mean(&load[..third.min(load.len())]), mean(&load[load.len().saturating_sub(third)..]))
}

/// The table of SOAK.md: about `rows` samples spread over the run.
pub(crate) fn table(samples: &[Sample], rows: usize) -> String {
    let mut out = String::new();
    let replicas = samples.first().map(|s| s.rss_mb.len()).unwrap_or(0);
    let rss_heads: Vec<String> = (0..replicas).map(|i| format!("RSS r{i} MB")).collect();
    let _ = writeln!(
        out,
        "| t (s) | completed | WP/s | Redis MB | DB MB | {} | WP rows | stream entries | incoming lag |",
        rss_heads.join(" | ")
    );
    let _ = writeln!(out, "|{}", "---:|".repeat(8 + replicas));
    let step = (samples.len() / rows.max(1)).max(1);
    for (i, s) in samples.iter().enumerate() {
        if i % step != 0 && i != samples.len() - 1 {
            continue;
        }
        let rss: Vec<String> = s.rss_mb.iter().map(|m| format!("{m:.1}")).collect();
        let _ = writeln!(
            out,
            "| {:.0} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} |",
            s.t_s,
            s.completed,
            s.wp_per_s,
            s.redis_mb,
            s.db_mb,
            rss.join(" | "),
            s.work_package_rows,
            s.stream_entries,
            s.incoming_lag
        );
    }
    out
}

/// Four panels over time: Redis memory, database size, each replica's RSS, throughput. The
/// shaded band is the last third of the load, where the plateau is judged; the dashed line
/// is where the load ended.
pub(crate) fn svg(samples: &[Sample], load_end_s: f64) -> String {
    const W: f64 = 900.0;
    const PH: f64 = 170.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 30.0;
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let t_max = samples.last().map(|s| s.t_s).unwrap_or(1.0).max(1.0);
    let replicas = samples.first().map(|s| s.rss_mb.len()).unwrap_or(0);
    type Get = Box<dyn Fn(&Sample) -> f64>;
    let mut panels: Vec<(&str, Vec<(String, Get)>)> = vec![
        ("Redis used_memory (MB)", vec![("redis".into(), Box::new(|s: &Sample| s.redis_mb))]),
        ("PostgreSQL database size (MB)", vec![("db".into(), Box::new(|s: &Sample| s.db_mb))]),
        ("replica RSS (MB)", Vec::new()),
        ("throughput (WP/s, completed)", vec![("wp/s".into(), Box::new(|s: &Sample| s.wp_per_s))]),
    ];
    for r in 0..replicas {
        panels[2].1.push((format!("replica {r}"), Box::new(move |s: &Sample| s.rss_mb.get(r).copied().unwrap_or(0.0))));
    }
    let height = TOP + panels.len() as f64 * (PH + 40.0);
    let mut out = String::new();
    let _ =
        writeln!(out, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / t_max;
    for (i, (title, lines)) in panels.iter().enumerate() {
        let y0 = TOP + i as f64 * (PH + 40.0);
        let max = lines.iter().flat_map(|(_, f)| samples.iter().map(f)).fold(0.0, f64::max).max(1e-9) * 1.1;
        let y = |v: f64| y0 + PH - PH * v / max;
        let _ = writeln!(out, r#"<text x="{LEFT}" y="{}" font-weight="bold">{title}</text>"#, y0 - 6.0);
        let band = x(load_end_s * 2.0 / 3.0);
        let _ = writeln!(out, r##"<rect x="{band:.1}" y="{y0}" width="{:.1}" height="{PH}" fill="#eeeeee"/>"##, x(load_end_s) - band);
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{y0}" x2="{0:.1}" y2="{1}" stroke="#888" stroke-dasharray="4 3"/>"##,
            x(load_end_s),
            y0 + PH
        );
        let _ = writeln!(out, r##"<rect x="{LEFT}" y="{y0}" width="{:.1}" height="{PH}" fill="none" stroke="#444"/>"##, W - LEFT - RIGHT);
        for frac in [0.0, 0.5, 1.0] {
            let v = max / 1.1 * frac;
            let _ = writeln!(out, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 4.0, y(v) + 4.0, fmt_value(v));
        }
        for (j, (name, f)) in lines.iter().enumerate() {
            let pts: Vec<String> = samples.iter().map(|s| format!("{:.1},{:.1}", x(s.t_s), y(f(s)))).collect();
            let c = colors[j % colors.len()];
            let _ = writeln!(out, r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#, pts.join(" "));
            if lines.len() > 1 {
                let _ = writeln!(out, r#"<text x="{:.1}" y="{}" fill="{c}">{name}</text>"#, W - RIGHT - 90.0, y0 + 14.0 + 14.0 * j as f64);
            }
        }
        let _ = writeln!(out, r#"<text x="{:.1}" y="{}" text-anchor="end">{t_max:.0} s</text>"#, W - RIGHT, y0 + PH + 14.0);
        let _ = writeln!(out, r#"<text x="{LEFT}" y="{}">0 s</text>"#, y0 + PH + 14.0);
    }
    out.push_str("</svg>\n");
    out
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plateau_is_judged_on_the_last_third_only() {
        let rising_then_flat: Vec<f64> = (0..30).map(|i| if i < 20 { i as f64 * 10.0 } else { 200.0 + (i % 2) as f64 * 10.0 }).collect();
        let p = plateau("x", &rising_then_flat, 10.0);
        assert!(p.held, "{p:?}");
        let still_rising: Vec<f64> = (0..30).map(|i| i as f64 * 10.0).collect();
        assert!(!plateau("x", &still_rising, 10.0).held);
    }
}
