//! Plans: a YAML list of work packages with lanes and dependencies. Parsed and checked here,
//! with no I/O, so that `submit` and a schedule (which holds a plan's text) refuse the same bad
//! plans, naming file, line and column.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::core::entry::{excerpt, is_valid_wp_id};
use crate::core::routing_file::{ConfigError, strip_location};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// (v1.6) The plan's budget in USD (`25.00`), sent as the `budget` field of every work
    /// package that does not give its own.
    #[serde(default)]
    pub budget: Option<serde_json::Value>,
    pub work_packages: Vec<PlannedWp>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedWp {
    pub wp_id: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub work_type: Option<String>,
    #[serde(default)]
    pub trigger: Option<String>,
    #[serde(default)]
    pub lane: Option<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Text as is; anything else is sent as JSON.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Extra fields passed through to the trigger.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

/// The same document again, for where each wp_id and dependency list was written.
#[derive(Deserialize)]
struct Positions {
    work_packages: Spanned<Vec<WpPositions>>,
}

#[derive(Deserialize)]
struct WpPositions {
    wp_id: Spanned<String>,
    #[serde(default)]
    depends_on: Option<Spanned<Vec<String>>>,
}

fn at<T>(s: &Spanned<T>) -> (u64, u64) {
    (s.referenced.line(), s.referenced.column())
}

/// Parses and checks a plan's text; `origin` (its file name) heads every error. `max_prefix`
/// is the longest prefix the plan will be submitted with: every wp_id must stay valid with it.
pub fn parse(text: &str, origin: &str, max_prefix: usize) -> Result<Plan, ConfigError> {
    let err_at = |(line, column): (u64, u64), message: String| ConfigError::At { file: origin.to_string(), line, column, message };
    let yaml = |e: serde_saphyr::Error| {
        let message = e.without_snippet().to_string();
        let message = message.lines().next().unwrap_or("invalid YAML").trim().to_string();
        match e.location() {
            Some(l) if l.line() > 0 => err_at((l.line(), l.column()), strip_location(&message)),
            _ => ConfigError::File { file: origin.to_string(), message },
        }
    };
    let mut plan: Plan = serde_saphyr::from_str(text).map_err(yaml)?;
    let positions: Positions = serde_saphyr::from_str(text).map_err(yaml)?;
    if plan.work_packages.is_empty() {
        return Err(err_at(at(&positions.work_packages), "work_packages is empty; a plan needs at least one".into()));
    }
    let longest = 128 - max_prefix.min(127);
    let mut seen = HashSet::new();
    for wp in &positions.work_packages.value {
        let id = &wp.wp_id.value;
        if !is_valid_wp_id(id) || id.len() > longest {
            return Err(err_at(at(&wp.wp_id), format!("wp_id {} must match [A-Za-z0-9._:-]{{1,{longest}}}", excerpt(id))));
        }
        if !seen.insert(id.as_str()) {
            return Err(err_at(at(&wp.wp_id), format!("wp_id {id} appears twice in the plan")));
        }
        if let Some(deps) = &wp.depends_on
            && let Some(d) = deps.value.iter().find(|d| !is_valid_wp_id(d) || d.len() > longest)
        {
            return Err(err_at(at(deps), format!("depends_on entry {} is not a valid wp_id", excerpt(d))));
        }
    }
    if let Some(b) = plan.budget.take() {
        let usd = match b {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        for wp in &mut plan.work_packages {
            wp.fields.entry("budget".into()).or_insert_with(|| usd.clone());
        }
    }
    Ok(plan)
}

impl Plan {
    /// Prefixes every wp_id and dependency, so one plan file can be submitted many times.
    pub fn with_prefix(mut self, prefix: &str) -> Plan {
        for wp in &mut self.work_packages {
            wp.wp_id = format!("{prefix}{}", wp.wp_id);
            for d in &mut wp.depends_on {
                *d = format!("{prefix}{d}");
            }
        }
        self
    }

    pub fn wp_ids(&self) -> Vec<String> {
        self.work_packages.iter().map(|w| w.wp_id.clone()).collect()
    }

    /// Every work package's incoming entry, in plan order.
    pub fn entries(&self) -> Vec<Vec<(String, String)>> {
        self.work_packages.iter().map(PlannedWp::fields).collect()
    }
}

impl PlannedWp {
    /// The incoming entry's fields.
    pub fn fields(&self) -> Vec<(String, String)> {
        let mut out = vec![("wp_id".to_string(), self.wp_id.clone())];
        let optional = [("agent_id", &self.agent_id), ("work_type", &self.work_type), ("trigger", &self.trigger), ("lane", &self.lane)];
        for (k, v) in optional {
            if let Some(v) = v {
                out.push((k.to_string(), v.clone()));
            }
        }
        if !self.depends_on.is_empty() {
            out.push(("depends_on".into(), self.depends_on.join(",")));
        }
        match &self.payload {
            Some(serde_json::Value::String(s)) => out.push(("payload".into(), s.clone())),
            Some(v) => out.push(("payload".into(), v.to_string())),
            None => {}
        }
        out.extend(self.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_example_plan() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/plan.yaml")).unwrap();
        let plan = parse(&text, "examples/plan.yaml", 40).unwrap();
        assert!(plan.work_packages.len() > 3);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let unknown = parse("work_packages:\n  - wp_id: a\n    colour: red\n", "p.yaml", 0).unwrap_err().to_string();
        assert!(unknown.starts_with("p.yaml:3:"), "{unknown}");
        let bad_id = parse("work_packages:\n  - wp_id: a\n  - wp_id: ../b\n", "p.yaml", 0).unwrap_err().to_string();
        assert!(bad_id.starts_with("p.yaml:3:12:") && bad_id.contains("wp_id"), "{bad_id}");
        let twice = parse("work_packages:\n  - wp_id: a\n  - wp_id: a\n", "p.yaml", 0).unwrap_err().to_string();
        assert!(twice.starts_with("p.yaml:3:") && twice.contains("twice"), "{twice}");
        let empty = parse("work_packages: []\n", "p.yaml", 0).unwrap_err().to_string();
        assert!(empty.starts_with("p.yaml:1:") && empty.contains("empty"), "{empty}");
    }

    #[test]
    fn a_wp_id_must_leave_room_for_the_prefix() {
        let long = "x".repeat(100);
        let text = format!("work_packages:\n  - wp_id: {long}\n");
        assert!(parse(&text, "p.yaml", 0).is_ok());
        assert!(parse(&text, "p.yaml", 40).unwrap_err().to_string().contains("{1,88}"));
    }
}
