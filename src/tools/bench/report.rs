//! The benchmark's results: one line per workload as it finishes, then a table of every figure
//! beside its target, and the same as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub(crate) fn from_us(samples: impl Iterator<Item = u64>) -> Latency {
        let Ok(mut h) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3) else { return Latency::default() };
        for s in samples {
            let _ = h.record(s.max(1));
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// The figures of one workload.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Run {
    pub workload: String,
    pub work_packages: usize,
    /// Work packages whose trigger (route, ceiling) or completion (dag, takeover) was seen; for
    /// chains, those PostgreSQL records as completed.
    pub finished: usize,
    pub seconds: f64,
    pub wp_per_s: f64,
    /// route and ceiling: from sending the incoming entry to seeing its trigger.
    pub ingest_to_trigger: Option<Latency>,
    /// dag: from the completion of a work package's last prerequisite to its trigger.
    pub completion_to_dispatch: Option<Latency>,
    pub duplicates: usize,
    pub lost: usize,
    /// Peak RSS of each replica, in MB.
    pub peak_rss_mb: Vec<f64>,
    pub takeover: Option<Takeover>,
    pub fair_wait: Option<FairWait>,
    pub held_backlog: Option<HeldBacklog>,
}

/// `free`'s paced chains behind held backlogs, and without (issue 18). The run's
/// `completion_to_dispatch` is the figure behind the backlog.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct HeldBacklog {
    /// Work packages of the paused and the full agent.
    pub backlog: usize,
    /// The backlog in PostgreSQL when `free`'s work started, by status and wait reason.
    pub backlog_statuses: BTreeMap<String, i64>,
    /// `free`'s completion->dispatch with no backlog, on the same replicas.
    pub baseline: Latency,
    pub baseline_finished: usize,
    pub baseline_work_packages: usize,
    pub baseline_starved: bool,
    /// `free`'s work packages behind the backlog whose trigger was seen.
    pub dispatched: usize,
    /// `free`'s work stopped moving behind the backlog (nothing dispatched for 10 s).
    pub starved: bool,
    /// From the first send behind the backlog until the phase ended.
    pub waited_s: f64,
    /// When `free`'s work did not all complete: where it stayed, by status and wait reason.
    pub free_statuses: BTreeMap<String, i64>,
    /// Triggers the paused agent got: must be 0.
    pub held_dispatched: usize,
    /// Triggers the full agent got: must be 1 (its max_in_flight, never completed).
    pub full_dispatched: usize,
}

impl HeldBacklog {
    /// The pause and the cap held.
    fn sound(&self) -> bool {
        self.held_dispatched == 0 && self.full_dispatched == 1 && self.baseline_finished == self.baseline_work_packages
    }
}

/// Our figure over the peer's, from the same run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PeerRatio {
    /// Our workload: route or chains.
    pub shape: String,
    pub ours_wp_per_s: f64,
    pub bullmq_jobs_per_s: f64,
    pub ratio: f64,
}

/// 4.4k, or 950 below a thousand.
fn rate(x: f64) -> String {
    if x >= 1000.0 { format!("{:.1}k", x / 1000.0) } else { format!("{x:.0}") }
}

impl PeerRatio {
    /// `route: 4.4k WP/s, BullMQ 7.9k jobs/s: 0.56×`
    pub(crate) fn line(&self) -> String {
        format!("{}: {} WP/s, BullMQ {} jobs/s: {:.2}×", self.shape, rate(self.ours_wp_per_s), rate(self.bullmq_jobs_per_s), self.ratio)
    }
}

/// A small plan behind a large backlog (v1.4).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct FairWait {
    /// Work packages waiting as `ready` when the small plan was sent.
    pub backlog_ready: usize,
    /// From sending the small plan to the first trigger of it.
    pub first_dispatch_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Takeover {
    /// Entries of the killed replica pending at the kill (incoming and completed streams).
    pub pending_at_kill: usize,
    /// From the kill until the last of those was processed by the survivor.
    pub processed_after_s: Option<f64>,
    /// From the kill until the dead consumer left the group.
    pub left_group_after_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Target {
    pub name: &'static str,
    pub target: String,
    pub measured: Option<f64>,
    pub unit: &'static str,
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub machine: String,
    pub replicas: usize,
    pub batch_size: usize,
    pub runs: Vec<Run>,
    /// route WP/s divided by ceiling WP/s.
    pub route_ceiling_ratio: Option<f64>,
    /// capped-controls WP/s divided by capped WP/s: what priorities and fair share cost (v1.4).
    pub controls_ratio: Option<f64>,
    /// route and chains over BullMQ in the same shapes, when both ran.
    pub peer: Vec<PeerRatio>,
    pub targets: Vec<Target>,
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs, {model}")
}

pub fn line(r: &Run) -> String {
    if let Some(h) = &r.held_backlog {
        return held_line(r, h);
    }
    let lat = r
        .ingest_to_trigger
        .as_ref()
        .map(|l| format!("ingest->trigger p50 {:.1} ms p99 {:.1} ms", l.p50_ms, l.p99_ms))
        .or_else(|| {
            r.completion_to_dispatch.as_ref().map(|l| format!("completion->dispatch p50 {:.2} ms p99 {:.2} ms", l.p50_ms, l.p99_ms))
        })
        .unwrap_or_default();
    format!("{:<13} {}/{} WP in {:.2} s = {:.0} WP/s  {lat}", r.workload, r.finished, r.work_packages, r.seconds, r.wp_per_s)
}

fn percentiles(l: &Latency) -> String {
    format!("p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms", l.p50_ms, l.p99_ms, l.p999_ms)
}

/// `free`'s figures behind the backlog and without, or that it starved.
fn held_line(r: &Run, h: &HeldBacklog) -> String {
    let base = if h.baseline_finished < h.baseline_work_packages {
        format!("with no backlog only {} of {} completed", h.baseline_finished, h.baseline_work_packages)
    } else {
        format!("with no backlog {}", percentiles(&h.baseline))
    };
    let behind = match (h.starved, &r.completion_to_dispatch) {
        (true, _) => {
            format!(
                "free: {} of {} dispatched within {:.1} s of the first send, none in the last 10 s: starved",
                h.dispatched, r.work_packages, h.waited_s
            )
        }
        (false, _) if r.finished < r.work_packages => {
            format!("free: {} of {} completed within --timeout ({:.0} s)", r.finished, r.work_packages, h.waited_s)
        }
        (false, Some(l)) => format!("free's completion->dispatch behind {} held {}", h.backlog, percentiles(l)),
        (false, None) => String::new(),
    };
    format!("{:<13} {behind}; {base}", r.workload)
}

impl Report {
    pub fn new(replicas: usize, batch_size: usize, runs: Vec<Run>) -> Report {
        let get = |w: &str| runs.iter().find(|r| r.workload == w);
        let ratio = match (get("route"), get("ceiling")) {
            (Some(r), Some(c)) if c.wp_per_s > 0.0 => Some(r.wp_per_s / c.wp_per_s),
            _ => None,
        };
        let controls_ratio = match (get("capped-controls"), get("capped")) {
            (Some(c), Some(p)) if p.wp_per_s > 0.0 => Some(c.wp_per_s / p.wp_per_s),
            _ => None,
        };
        let peer: Vec<PeerRatio> = [("route", "bullmq-route"), ("chains", "bullmq-chains")]
            .into_iter()
            .filter_map(|(ours, theirs)| {
                let (o, t) = (get(ours)?, get(theirs)?);
                (t.wp_per_s > 0.0).then(|| PeerRatio {
                    shape: ours.into(),
                    ours_wp_per_s: o.wp_per_s,
                    bullmq_jobs_per_s: t.wp_per_s,
                    ratio: o.wp_per_s / t.wp_per_s,
                })
            })
            .collect();
        let peer_ratio = |shape: &str| peer.iter().find(|p| p.shape == shape).map(|p| p.ratio);
        let held = get("held-backlog").and_then(|r| Some((r, r.held_backlog.as_ref()?)));
        let takeover = get("takeover").and_then(|r| r.takeover.as_ref()).and_then(|t| t.processed_after_s.or(t.left_group_after_s));
        let rss = runs.iter().flat_map(|r| r.peak_rss_mb.iter().copied()).fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        let at_least = |name, target: f64, measured: Option<f64>, unit| Target {
            name,
            target: format!(">= {target}"),
            measured,
            unit,
            met: measured.map(|m| m >= target),
        };
        let at_most = |name, target: f64, measured: Option<f64>, unit| Target {
            name,
            target: format!("<= {target}"),
            measured,
            unit,
            met: measured.map(|m| m <= target),
        };
        let targets = vec![
            at_least("route throughput", 30_000.0, get("route").map(|r| r.wp_per_s), "WP/s"),
            at_least("chains throughput (backlog)", 10_000.0, get("chains").map(|r| r.wp_per_s), "WP/s"),
            at_least("route / ceiling", 0.3, ratio, "ratio"),
            at_most(
                "completion->dispatch p99 (dag-paced)",
                5.0,
                get("dag-paced").and_then(|r| r.completion_to_dispatch.as_ref()).map(|l| l.p99_ms),
                "ms",
            ),
            at_most("peak RSS per replica", 50.0, rss, "MB"),
            at_most("takeover after kill -9", 3.0, takeover, "s"),
            at_least("capped-controls / capped", 0.9, controls_ratio, "ratio"),
            at_most(
                "small plan's first dispatch (fair-wait)",
                1.0,
                get("fair-wait").and_then(|r| r.fair_wait.as_ref()).map(|f| f.first_dispatch_s),
                "s",
            ),
            at_least("route / BullMQ no-op jobs", 1.0, peer_ratio("route"), "ratio"),
            at_least("chains / BullMQ flows of 10", 1.0, peer_ratio("chains"), "ratio"),
            // Starved is a miss with nothing to measure.
            match held {
                Some((_, h)) if h.starved => Target { met: Some(false), ..at_most("free's p99 behind held backlog", 10.0, None, "ms") },
                _ => at_most(
                    "free's p99 behind held backlog",
                    10.0,
                    held.and_then(|(r, _)| r.completion_to_dispatch.as_ref()).map(|l| l.p99_ms),
                    "ms",
                ),
            },
        ];
        Report { machine: machine(), replicas, batch_size, runs, route_ceiling_ratio: ratio, controls_ratio, peer, targets }
    }

    /// Every workload finished with nothing lost or doubled. Speed is reported, not judged.
    pub(crate) fn sound(&self) -> bool {
        self.runs.iter().all(|r| {
            r.lost == 0 && r.duplicates == 0 && r.finished == r.work_packages && r.held_backlog.as_ref().is_none_or(HeldBacklog::sound)
        })
    }

    pub fn table(&self) -> String {
        let mut s = format!("\nmachine: {}; {} replicas, batch {}\n\n", self.machine, self.replicas, self.batch_size);
        s += &format!(
            "{:<13} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>5} {:>4}  {}\n",
            "workload", "WP", "WP/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "lost", "dup", "peak RSS MB"
        );
        for r in &self.runs {
            let l = r.ingest_to_trigger.as_ref().or(r.completion_to_dispatch.as_ref());
            let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
            let rss = r.peak_rss_mb.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join(" / ");
            s += &format!(
                "{:<13} {:>8} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>5} {:>4}  {}\n",
                r.workload,
                r.finished,
                r.wp_per_s,
                f(l.map(|l| l.p50_ms)),
                f(l.map(|l| l.p99_ms)),
                f(l.map(|l| l.p999_ms)),
                f(l.map(|l| l.max_ms)),
                r.lost,
                r.duplicates,
                if rss.is_empty() { "-".into() } else { rss }
            );
        }
        s += "\nlatency: route and ceiling from sending the incoming entry to seeing its trigger (queueing included);\n         dag and held-backlog from the completion of the last prerequisite to seeing the next trigger;\n         bullmq-route from adding a job to its start, bullmq-chains from the end of a step to the start of the next.\n";
        if let Some(t) = self.runs.iter().find_map(|r| r.takeover.as_ref()) {
            let f = |v: Option<f64>| v.map(|v| format!("{v:.2} s")).unwrap_or_else(|| "-".into());
            s += &format!(
                "takeover: {} entries pending at the kill, processed {} after it; the dead consumer left the group after {}\n",
                t.pending_at_kill,
                f(t.processed_after_s),
                f(t.left_group_after_s)
            );
        }
        if let Some(f) = self.runs.iter().find_map(|r| r.fair_wait.as_ref()) {
            s += &format!(
                "fair-wait: a plan of 10 sent behind {} ready work packages of one plan; its first dispatch after {:.3} s\n",
                f.backlog_ready, f.first_dispatch_s
            );
        }
        if let Some((r, h)) = self.runs.iter().find_map(|r| Some((r, r.held_backlog.as_ref()?))) {
            // Wait reasons hold commas and colons of their own.
            let statuses = |m: &BTreeMap<String, i64>| m.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join("; ");
            s += &format!("held-backlog: {}\n", held_line(r, h).trim_start_matches(r.workload.as_str()).trim_start());
            s += &format!(
                "  the backlog ({} for a paused and a full agent): {}; the paused agent got {} triggers, the full one {}\n",
                h.backlog,
                statuses(&h.backlog_statuses),
                h.held_dispatched,
                h.full_dispatched
            );
            if let (Some(l), false) = (&r.completion_to_dispatch, h.starved || h.baseline.p99_ms <= 0.0) {
                s += &format!("  p99 behind the backlog / p99 without: {:.2}\n", l.p99_ms / h.baseline.p99_ms);
            }
            if !h.free_statuses.is_empty() {
                s += &format!("  free's work at the end: {}\n", statuses(&h.free_statuses));
            }
        }
        for p in &self.peer {
            s += &format!("{}\n", p.line());
        }
        s += &format!("\n{:<39} {:<10} {:<14} met\n", "target", "goal", "measured");
        for t in &self.targets {
            let m = t.measured.map(|m| format!("{m:.2} {}", t.unit)).unwrap_or_else(|| "-".into());
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            s += &format!("{:<39} {:<10} {:<14} {met}\n", t.name, t.target, m);
        }
        s
    }
}
