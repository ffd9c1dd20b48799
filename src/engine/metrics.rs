//! The replica's own Prometheus recorder: counters and the dispatch-latency histogram.
//!
//! It is owned by the replica (not the process-global recorder), because tests and the chaos
//! harness run several replicas in one process and each must report its own. The scrape-time
//! gauges and the exposition are `ops::metrics`.

use metrics::{Key, Label, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub(crate) const ROUTED: &str = "ge_entries_routed_total";
pub(crate) const COMPLETED: &str = "ge_entries_completed_total";
pub(crate) const FAILED: &str = "ge_entries_failed_total";
pub(crate) const DEADLETTERED: &str = "ge_entries_deadlettered_total";
pub(crate) const DISPATCH_LATENCY: &str = "ge_dispatch_latency_seconds";
pub(crate) const TRIMMED: &str = "ge_stream_trimmed_entries_total";
pub(crate) const REMOVED: &str = "ge_retention_removed_rows_total";
pub(crate) const PUBLISH_REFUSED: &str = "ge_trigger_publish_refused_total";
pub(crate) const SCHEDULE_FIRINGS: &str = "ge_schedule_firings_total";

/// Seconds from "may run" to "trigger published": sub-second normally, minutes when agents
/// are full.
const LATENCY_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

static METADATA: metrics::Metadata<'static> = metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// This replica's recorder and the handle that renders it.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DISPATCH_LATENCY.into()), &LATENCY_BUCKETS)
            .map(|b| b.build_recorder())
            // The buckets are constant and non-empty, so this arm is never taken; a summary
            // instead of a histogram would still be a valid exposition.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        Metrics { recorder, handle }
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        if n == 0 {
            return;
        }
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
        self.recorder.register_counter(&Key::from_parts(name, labels), &METADATA).increment(n);
    }

    /// A work package claimed and published to `agent` by a route of `kind`.
    pub fn routed(&self, agent: &str, kind: &str) {
        self.counter(ROUTED, &[("route", kind), ("agent", agent)], 1);
    }
    pub fn completed(&self, agent: &str, kind: &str) {
        self.counter(COMPLETED, &[("route", kind), ("agent", agent)], 1);
    }
    pub fn failed(&self, agent: &str, kind: &str) {
        self.counter(FAILED, &[("route", kind), ("agent", agent)], 1);
    }
    /// Dead letters carry no route (most never got one); the reason and the agent the entry
    /// asked for, if any, are what an operator filters on. `agent` must come from a bounded
    /// set (see `Ctx::note_deadletters`).
    pub(crate) fn deadlettered(&self, reason: &str, agent: &str) {
        self.counter(DEADLETTERED, &[("reason", reason), ("agent", agent)], 1);
    }
    /// Entries removed from `stream` by this replica's trims (v1.3).
    pub(crate) fn trimmed(&self, stream: &str, n: u64) {
        self.counter(TRIMMED, &[("stream", stream)], n);
    }
    /// Rows of `table` removed by this replica's retention (v1.3).
    pub(crate) fn removed(&self, table: &str, n: u64) {
        self.counter(REMOVED, &[("table", table)], n);
    }
    /// A trigger Redis refused to add (it stays claimed and is published again later).
    pub(crate) fn publish_refused(&self, agent: &str) {
        self.counter(PUBLISH_REFUSED, &[("agent", agent)], 1);
    }
    /// Firings of a schedule decided by this replica (v1.6), by outcome: `submitted`,
    /// `skipped_overlap`, `missed`. Schedules are operators' (at most `MAX_SCHEDULES` at once),
    /// so the label is bounded by what they define.
    pub(crate) fn schedule_firings(&self, schedule: &str, outcome: &str, n: u64) {
        self.counter(SCHEDULE_FIRINGS, &[("schedule", schedule), ("outcome", outcome)], n);
    }
    pub(crate) fn dispatch_latency(&self, agent: &str, kind: &str, seconds: f64) {
        let labels = vec![Label::new("route", kind.to_string()), Label::new("agent", agent.to_string())];
        self.recorder.register_histogram(&Key::from_parts(DISPATCH_LATENCY, labels), &METADATA).record(seconds.max(0.0));
    }

    /// Drains the histograms' recorded samples into their buckets. The recorder keeps every
    /// sample until then, and only a scrape did it: a replica nobody scraped grew by every
    /// dispatch it made (about 10 bytes each; found by the soak, SOAK.md).
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub(crate) fn render_recorded(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}
