//! The dispatches this agent process has run, with the report it sent for each: a trigger
//! delivered again with a `dispatch_id` already run is not run again; its report is sent
//! again. A Redis failover can lose a trigger the agent had already read (replication is
//! asynchronous), and the orchestrator, whose publication was never confirmed, publishes it
//! again; so can it lose the report. Bounded: the last `CAPACITY` dispatches.

use std::collections::{HashMap, VecDeque};

/// Far more dispatches than one agent runs in the seconds a failover can lose.
const CAPACITY: usize = 1_000;

/// Where a report went, and its fields.
pub(super) type Report = (String, Vec<(&'static str, String)>);

#[derive(Default)]
pub(super) struct Handled {
    order: VecDeque<String>,
    reports: HashMap<String, Report>,
}

impl Handled {
    /// The report sent for `dispatch_id`, if this process ran it.
    pub fn get(&self, dispatch_id: &str) -> Option<&Report> {
        self.reports.get(dispatch_id)
    }

    /// Remembers the report of a dispatch that ran, forgetting the oldest beyond the bound.
    pub fn insert(&mut self, dispatch_id: &str, report: Report) {
        if dispatch_id.is_empty() || self.reports.insert(dispatch_id.to_string(), report).is_some() {
            return;
        }
        self.order.push_back(dispatch_id.to_string());
        while self.order.len() > CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.reports.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_dispatches_only() {
        let mut h = Handled::default();
        for i in 0..CAPACITY + 5 {
            h.insert(&format!("w{i}:1"), ("ge:work:completed".into(), vec![("wp_id", format!("w{i}"))]));
        }
        assert!(h.get("w0:1").is_none() && h.get("w4:1").is_none(), "the oldest are forgotten");
        assert_eq!(h.get(&format!("w{}:1", CAPACITY + 4)).map(|r| r.0.as_str()), Some("ge:work:completed"));
        h.insert("", ("x".into(), Vec::new()));
        assert!(h.get("").is_none(), "a trigger without a dispatch_id is not remembered");
    }
}
