//! Plans: a YAML list of work packages with lanes and dependencies, and `submit`, which sends
//! them to `ge:work:incoming` in order.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

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

impl Plan {
    pub fn load(path: &Path) -> anyhow::Result<Plan> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading plan {}", path.display()))?;
        let mut plan: Plan = serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
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

/// Sends the plan's work packages to the incoming stream in one pipeline, in plan order.
pub async fn submit<C: redis::aio::ConnectionLike>(con: &mut C, incoming: &str, plan: &Plan) -> redis::RedisResult<Vec<String>> {
    let entries: Vec<Vec<(String, String)>> = plan.work_packages.iter().map(PlannedWp::fields).collect();
    crate::engine::streams::xadd_many(con, incoming, &entries).await
}
