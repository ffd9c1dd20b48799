//! The routing file (`config/dolly-routing.yaml`), parsed strictly: unknown keys, duplicate
//! keys, wrong types, undefined roles or agents and bad patterns are each an error naming the
//! file, line and column. The result is a resolved, immutable `RoutingTable`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::core::fnmatch::Pattern;

#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub version: u32,
    pub agents: BTreeMap<String, AgentSpec>,
    /// work_type -> role
    pub work_types: BTreeMap<String, String>,
    /// work_type -> how long a dispatch of that work type may run without a report (v1.1);
    /// wins over the agent's own timeout.
    pub work_type_timeouts: BTreeMap<String, Duration>,
    pub triggers: Vec<TriggerRule>,
    pub default_agent: Option<String>,
    pub retry: RetryPolicy,
    /// FNV-1a 64 of the file's bytes, in hex: the same file gives the same version anywhere.
    pub config_version: String,
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub roles: Vec<String>,
    /// None: unlimited.
    pub max_in_flight: Option<u32>,
    pub enabled: bool,
    /// How long a dispatch to this agent may run without a report (v1.1); None: no deadline.
    pub timeout: Option<Duration>,
    /// How many dispatches may start per minute, across replicas (v1.4); None: no limit.
    pub rate_limit: Option<RateLimit>,
    /// What the agent may spend per UTC day or month (v1.6); None: no budget.
    pub budget: Option<AgentBudget>,
}

/// An agent's budget (v1.6): once its reported spend in the current period reaches `usd`, no
/// more of its work is dispatched until the next period or a larger budget.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentBudget {
    /// Canonical decimal text (`core::usage::parse_usd`).
    pub usd: String,
    pub period: BudgetPeriod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl BudgetPeriod {
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }
}

/// A token bucket (v1.4): `per_minute` tokens a minute, at most `burst` saved up. A dispatch
/// takes one token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
}

impl RateLimit {
    pub fn per_second(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }
}

#[derive(Debug, Clone)]
pub struct TriggerRule {
    pub pattern: Pattern,
    pub target: TriggerTarget,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TriggerTarget {
    Role(String),
    Agent(String),
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 3, initial: Duration::from_secs(10), factor: 2.0, max: Duration::from_secs(600) }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `n` (1-based): initial · factor^(n-1), capped at max.
    pub(crate) fn delay_after(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.max(1) - 1;
        let secs = self.initial.as_secs_f64() * self.factor.powi(exp.min(1000) as i32);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() { self.max } else { Duration::from_secs_f64(secs) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is part of the message, not a `source`: every caller shows the whole
    /// error in one line, and a source would print its text twice in an error chain.
    #[error("{file}: cannot read the routing file: {error}")]
    Read { file: String, error: std::io::Error },
    #[error("{file}:{line}:{column}: {message}")]
    At { file: String, line: u64, column: u64, message: String },
    #[error("{file}: {message}")]
    File { file: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: Spanned<u32>,
    agents: Spanned<BTreeMap<String, Spanned<RawAgent>>>,
    #[serde(default)]
    work_types: BTreeMap<String, Spanned<RawWorkType>>,
    #[serde(default)]
    triggers: Vec<Spanned<RawTrigger>>,
    #[serde(default)]
    default_agent: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    max_in_flight: Option<Spanned<u32>>,
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    rate_limit: Option<Spanned<RawRateLimit>>,
    #[serde(default)]
    budget: Option<Spanned<RawBudget>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    #[serde(default)]
    per_day: Option<Spanned<RawAmount>>,
    #[serde(default)]
    per_month: Option<Spanned<RawAmount>>,
}

/// An amount written as a number (`25.5`) or a string (`"25.50"`). A number is read as YAML
/// reads it and written back in its shortest form, which is its literal for any amount of at
/// most 15 significant digits.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawAmount {
    Int(u64),
    Num(f64),
    Text(String),
}

impl RawAmount {
    fn text(&self) -> String {
        match self {
            RawAmount::Int(n) => n.to_string(),
            RawAmount::Num(f) => f.to_string(),
            RawAmount::Text(s) => s.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_minute: Spanned<u32>,
    #[serde(default)]
    burst: Option<Spanned<u32>>,
}

/// A work type names its role, or (v1.1) its role and a timeout. Untagged, so the parser
/// buffers it and positions inside are lost: errors point at the work type itself.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawWorkType {
    Role(String),
    Full(RawWorkTypeSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkTypeSpec {
    role: String,
    #[serde(default)]
    timeout: Option<String>,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    pattern: Spanned<String>,
    #[serde(default)]
    role: Option<Spanned<String>>,
    #[serde(default)]
    agent: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    max_attempts: Option<Spanned<u32>>,
    #[serde(default)]
    backoff: Option<RawBackoff>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    #[serde(default)]
    initial: Option<Spanned<String>>,
    #[serde(default)]
    factor: Option<Spanned<f64>>,
    #[serde(default)]
    max: Option<Spanned<String>>,
}

/// Line and column where a value was written.
fn at<T>(s: &Spanned<T>) -> (u64, u64) {
    (s.referenced.line(), s.referenced.column())
}

static AGENT_NAME: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[A-Za-z0-9._-]{1,64}$").expect("static regex"));

fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn load(path: &Path) -> Result<RoutingTable, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { file: file.clone(), error })?;
    parse(&text, &file)
}

pub fn parse(source_text: &str, origin: &str) -> Result<RoutingTable, ConfigError> {
    let err_at = |(line, column): (u64, u64), message: String| ConfigError::At { file: origin.to_string(), line, column, message };
    let positive_duration = |value: &str, where_: (u64, u64), what: &str| match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(err_at(where_, format!("{what} must be longer than 0 (leave it out for no deadline)"))),
        Err(e) => Err(err_at(where_, format!("{what} {value:?} is not a duration like 30s or 10m: {e}"))),
    };

    let raw: RawFile = serde_saphyr::from_str(source_text).map_err(|e| {
        let message = e.without_snippet().to_string();
        let message = message.lines().next().unwrap_or("invalid YAML").trim().to_string();
        match e.location() {
            Some(l) if l.line() > 0 => err_at((l.line(), l.column()), strip_location(&message)),
            _ => ConfigError::File { file: origin.to_string(), message },
        }
    })?;

    if raw.version.value != 1 {
        return Err(err_at(at(&raw.version), format!("version {} is not supported; this orchestrator reads version 1", raw.version.value)));
    }
    if raw.agents.value.is_empty() {
        return Err(err_at(at(&raw.agents), "agents is empty; define at least one agent".into()));
    }
    let mut agents = BTreeMap::new();
    for (name, spec) in &raw.agents.value {
        if !AGENT_NAME.is_match(name) {
            return Err(err_at(
                at(spec),
                format!("agent name {name:?} must match [A-Za-z0-9._-]{{1,64}}: it becomes the stream name triggers.{{agent}}"),
            ));
        }
        if let Some(cap) = &spec.value.max_in_flight
            && cap.value == 0
        {
            return Err(err_at(at(cap), format!("agents.{name}.max_in_flight must be at least 1 (leave it out for no limit)")));
        }
        let timeout =
            spec.value.timeout.as_ref().map(|t| positive_duration(&t.value, at(t), &format!("agents.{name}.timeout"))).transpose()?;
        let rate_limit = match &spec.value.rate_limit {
            None => None,
            Some(r) => {
                if r.value.per_minute.value == 0 {
                    return Err(err_at(
                        at(&r.value.per_minute),
                        format!("agents.{name}.rate_limit.per_minute must be at least 1 (disable the agent to stop it)"),
                    ));
                }
                if let Some(b) = &r.value.burst
                    && b.value == 0
                {
                    return Err(err_at(at(b), format!("agents.{name}.rate_limit.burst must be at least 1")));
                }
                Some(RateLimit { per_minute: r.value.per_minute.value, burst: r.value.burst.as_ref().map_or(1, |b| b.value) })
            }
        };
        let budget = match &spec.value.budget {
            None => None,
            Some(b) => {
                let (amount, period) = match (&b.value.per_day, &b.value.per_month) {
                    (Some(d), None) => (d, BudgetPeriod::Day),
                    (None, Some(m)) => (m, BudgetPeriod::Month),
                    _ => return Err(err_at(at(b), format!("agents.{name}.budget takes one of per_day or per_month (USD)"))),
                };
                let what = format!("agents.{name}.budget.per_{}", period.as_str());
                let usd = crate::core::usage::parse_usd(&amount.value.text()).map_err(|e| err_at(at(amount), format!("{what}: {e}")))?;
                if usd == "0" {
                    return Err(err_at(at(amount), format!("{what} must be more than 0 (disable the agent to stop it)")));
                }
                Some(AgentBudget { usd, period })
            }
        };
        agents.insert(
            name.clone(),
            AgentSpec {
                budget,
                roles: spec.value.roles.clone(),
                max_in_flight: spec.value.max_in_flight.as_ref().map(|c| c.value),
                enabled: spec.value.enabled,
                timeout,
                rate_limit,
            },
        );
    }
    let roles: BTreeSet<&str> = agents.values().flat_map(|a| a.roles.iter().map(String::as_str)).collect();
    let role_list = roles.iter().copied().collect::<Vec<_>>().join(", ");
    let agent_list = agents.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
    let check_role_at = |role: &str, where_: (u64, u64), what: String| {
        if roles.contains(role) {
            Ok(())
        } else {
            Err(err_at(where_, format!("{what} refers to role {role:?}, which no agent has (roles defined: {role_list})")))
        }
    };
    let check_role = |role: &Spanned<String>, what: String| check_role_at(&role.value, at(role), what);
    let check_agent = |agent: &Spanned<String>, what: String| {
        if agents.contains_key(&agent.value) {
            Ok(())
        } else {
            Err(err_at(
                at(agent),
                format!("{what} refers to agent {:?}, which is not defined under agents (agents: {agent_list})", agent.value),
            ))
        }
    };

    let mut work_types = BTreeMap::new();
    let mut work_type_timeouts = BTreeMap::new();
    for (wt, spec) in &raw.work_types {
        let (role, timeout) = match &spec.value {
            RawWorkType::Role(role) => (role, None),
            RawWorkType::Full(full) => (&full.role, full.timeout.as_ref()),
        };
        check_role_at(role, at(spec), format!("work_types.{wt}"))?;
        work_types.insert(wt.clone(), role.clone());
        if let Some(t) = timeout {
            work_type_timeouts.insert(wt.clone(), positive_duration(t, at(spec), &format!("work_types.{wt}.timeout"))?);
        }
    }

    let mut triggers = Vec::new();
    for (n, t) in raw.triggers.iter().enumerate() {
        let what = format!("triggers[{n}]");
        let target = match (&t.value.role, &t.value.agent) {
            (Some(role), None) => {
                check_role(role, what.clone())?;
                TriggerTarget::Role(role.value.clone())
            }
            (None, Some(agent)) => {
                check_agent(agent, what.clone())?;
                TriggerTarget::Agent(agent.value.clone())
            }
            _ => return Err(err_at(at(t), format!("{what} needs exactly one of role or agent"))),
        };
        let pattern = Pattern::new(&t.value.pattern.value).map_err(|e| err_at(at(&t.value.pattern), format!("{what}.pattern: {e}")))?;
        triggers.push(TriggerRule { pattern, target });
    }

    if let Some(d) = &raw.default_agent {
        check_agent(d, "default_agent".into())?;
    }

    let mut retry = RetryPolicy::default();
    if let Some(r) = &raw.retry {
        if let Some(m) = &r.max_attempts {
            if m.value == 0 {
                return Err(err_at(at(m), "retry.max_attempts must be at least 1".into()));
            }
            retry.max_attempts = m.value;
        }
        if let Some(b) = &r.backoff {
            let dur = |s: &Spanned<String>, what: &str| {
                humantime::parse_duration(&s.value)
                    .map_err(|e| err_at(at(s), format!("retry.backoff.{what} {:?} is not a duration like 10s or 5m: {e}", s.value)))
            };
            if let Some(i) = &b.initial {
                retry.initial = dur(i, "initial")?;
            }
            if let Some(m) = &b.max {
                retry.max = dur(m, "max")?;
                if retry.max < retry.initial {
                    return Err(err_at(at(m), format!("retry.backoff.max {:?} is shorter than initial", m.value)));
                }
            }
            if let Some(f) = &b.factor {
                if !(f.value.is_finite() && f.value >= 1.0) {
                    return Err(err_at(at(f), format!("retry.backoff.factor must be at least 1, got {}", f.value)));
                }
                retry.factor = f.value;
            }
        }
    }

    Ok(RoutingTable {
        version: raw.version.value,
        agents,
        work_types,
        work_type_timeouts,
        triggers,
        default_agent: raw.default_agent.map(|d| d.value),
        retry,
        config_version: fnv1a(source_text.as_bytes()),
        source: origin.to_string(),
    })
}

/// serde-saphyr appends " at line L column C" to some messages; the prefix says it already.
pub(crate) fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].trim_end_matches(',').to_string(),
        None => message.to_string(),
    }
    // Library advice means nothing to the person editing the file.
    .split(", set DuplicateKeyPolicy")
    .next()
    .unwrap_or_default()
    .to_string()
}

impl RoutingTable {
    /// Agents having `role`, sorted by name.
    pub(crate) fn agents_with_role<'a, 'r>(&'a self, role: &'r str) -> impl Iterator<Item = (&'a str, &'a AgentSpec)> + use<'a, 'r> {
        self.agents.iter().filter(move |(_, a)| a.roles.iter().any(|r| r == role)).map(|(n, a)| (n.as_str(), a))
    }

    /// The resolved table, for `check-config`.
    /// How long a dispatch of `work_type` to `agent` may run without a report: the work
    /// type's timeout, else the agent's, else none.
    pub(crate) fn timeout_for(&self, agent: &str, work_type: Option<&str>) -> Option<Duration> {
        work_type.and_then(|wt| self.work_type_timeouts.get(wt).copied()).or_else(|| self.agents.get(agent).and_then(|a| a.timeout))
    }

    pub fn describe(&self) -> String {
        let mut out = format!("routing {} (version {}, config_version {})\n\nagents:\n", self.source, self.version, self.config_version);
        for (name, a) in &self.agents {
            let cap = a.max_in_flight.map(|c| c.to_string()).unwrap_or_else(|| "unlimited".into());
            let state = if a.enabled { "enabled" } else { "DISABLED" };
            let timeout = a.timeout.map(|t| format!("  timeout {}", humantime::format_duration(t))).unwrap_or_default();
            let rate = a.rate_limit.map(|r| format!("  rate_limit {}/min burst {}", r.per_minute, r.burst)).unwrap_or_default();
            let budget = a.budget.as_ref().map(|b| format!("  budget {} USD per {}", b.usd, b.period.as_str())).unwrap_or_default();
            out.push_str(&format!("  {name:<16} roles [{}]  max_in_flight {cap}  {state}{timeout}{rate}{budget}\n", a.roles.join(", ")));
        }
        out.push_str("\nwork_types:\n");
        for (wt, role) in &self.work_types {
            let cands: Vec<&str> = self.agents_with_role(role).filter(|(_, a)| a.enabled).map(|(n, _)| n).collect();
            let timeout =
                self.work_type_timeouts.get(wt).map(|t| format!("  timeout {}", humantime::format_duration(*t))).unwrap_or_default();
            out.push_str(&format!("  {wt:<16} -> role {role} -> [{}]{timeout}\n", cands.join(", ")));
        }
        out.push_str("\ntriggers (first match wins):\n");
        for t in &self.triggers {
            let target = match &t.target {
                TriggerTarget::Role(r) => format!("role {r}"),
                TriggerTarget::Agent(a) => format!("agent {a}"),
            };
            out.push_str(&format!("  {:<28} -> {target}\n", t.pattern.as_str()));
        }
        out.push_str(&format!(
            "\ndefault_agent: {}\nretry: max_attempts {}, backoff {} x{} up to {}\n",
            self.default_agent.as_deref().unwrap_or("(none: unroutable entries are dead-lettered)"),
            self.retry.max_attempts,
            humantime::format_duration(self.retry.initial),
            self.retry.factor,
            humantime::format_duration(self.retry.max)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = include_str!("../../config/dolly-routing.yaml");

    fn err(text: &str) -> String {
        parse(text, "r.yaml").expect_err("must be refused").to_string()
    }

    #[test]
    fn budgets_are_exact_amounts_per_day_or_month_and_errors_say_where() {
        let t = parse(
            "version: 1\nagents:\n  a: { roles: [r], budget: { per_day: 25.03 } }\n  b: { roles: [r], budget: { per_month: \"1000.50\" } }\n  c: { roles: [r], budget: { per_day: 7 } }\n",
            "r.yaml",
        )
        .unwrap();
        assert_eq!(t.agents["a"].budget, Some(AgentBudget { usd: "25.03".into(), period: BudgetPeriod::Day }));
        assert_eq!(t.agents["b"].budget, Some(AgentBudget { usd: "1000.5".into(), period: BudgetPeriod::Month }));
        assert_eq!(t.agents["c"].budget.as_ref().map(|b| b.usd.as_str()), Some("7"));
        let both = err("version: 1\nagents:\n  a:\n    budget: { per_day: 1, per_month: 2 }\n");
        assert!(both.starts_with("r.yaml:4:") && both.contains("one of per_day or per_month"), "{both}");
        let bad = err("version: 1\nagents:\n  a:\n    budget:\n      per_day: lots\n");
        assert!(bad.starts_with("r.yaml:5:") && bad.contains("not an amount of USD"), "{bad}");
        assert!(err("version: 1\nagents:\n  a:\n    budget: { per_day: 0 }\n").contains("more than 0"));
        assert!(err("version: 1\nagents:\n  a:\n    budget: { per_week: 3 }\n").starts_with("r.yaml:4:"));
    }

    #[test]
    fn rate_limits_default_to_a_burst_of_one_and_refuse_zero_where_written() {
        let t = parse(
            "version: 1\nagents:\n  a: { roles: [r], rate_limit: { per_minute: 30 } }\n  b: { roles: [r], rate_limit: { per_minute: 6, burst: 3 } }\n",
            "r.yaml",
        )
        .unwrap();
        assert_eq!(t.agents["a"].rate_limit, Some(RateLimit { per_minute: 30, burst: 1 }));
        assert_eq!(t.agents["b"].rate_limit, Some(RateLimit { per_minute: 6, burst: 3 }));
        let zero = err("version: 1\nagents:\n  a:\n    rate_limit: { per_minute: 0 }\n");
        assert!(zero.starts_with("r.yaml:4:") && zero.contains("per_minute"), "{zero}");
        let burst = err("version: 1\nagents:\n  a:\n    rate_limit:\n      per_minute: 5\n      burst: 0\n");
        assert!(burst.starts_with("r.yaml:6:") && burst.contains("burst"), "{burst}");
        assert!(err("version: 1\nagents:\n  a:\n    rate_limit: { per_hour: 5 }\n").starts_with("r.yaml:4:"));
    }

    #[test]
    fn timeouts_of_work_types_win_over_those_of_agents() {
        let t = parse(
            "version: 1\nagents:\n  a: { roles: [r], timeout: 10m }\n  b: { roles: [r] }\nwork_types:\n  plain: r\n  quick: { role: r, timeout: 30s }\n",
            "r.yaml",
        )
        .unwrap();
        assert_eq!(t.work_types["quick"], "r");
        assert_eq!(t.timeout_for("a", Some("quick")), Some(Duration::from_secs(30)));
        assert_eq!(t.timeout_for("a", Some("plain")), Some(Duration::from_secs(600)));
        assert_eq!(t.timeout_for("b", Some("plain")), None);
        assert_eq!(t.timeout_for("b", None), None);
    }

    #[test]
    fn a_zero_or_unreadable_timeout_is_refused_where_it_is_written() {
        let zero = err("version: 1\nagents:\n  a: { roles: [r], timeout: 0s }\n");
        assert!(zero.starts_with("r.yaml:3:") && zero.contains("agents.a.timeout must be longer than 0"), "{zero}");
        let bad = err("version: 1\nagents:\n  a: { roles: [r] }\nwork_types:\n  w: { role: r, timeout: soon }\n");
        assert!(bad.starts_with("r.yaml:5:") && bad.contains("work_types.w.timeout"), "{bad}");
    }

    #[test]
    fn parses_the_default_file() {
        let t = parse(GOOD, "dolly-routing.yaml").unwrap();
        assert_eq!(t.agents.len(), 4);
        assert_eq!(t.agents["ada"].max_in_flight, Some(4));
        assert!(!t.agents["hopper"].enabled);
        assert_eq!(t.work_types["code_review"], "reviewer");
        assert_eq!(t.triggers[1].target, TriggerTarget::Agent("hopper".into()));
        assert_eq!(t.default_agent.as_deref(), Some("dolly"));
        assert_eq!(t.retry.initial, Duration::from_secs(10));
        assert_eq!(t.retry.max, Duration::from_secs(600));
        assert_eq!(t.config_version, parse(GOOD, "elsewhere").unwrap().config_version, "the version depends on content only");
        assert_eq!(t.agents_with_role("developer").map(|(n, _)| n).collect::<Vec<_>>(), vec!["ada", "turing"]);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = err("version: 1\nagents:\n  ada: { roles: [dev], colour: blue }\n");
        assert!(e.starts_with("r.yaml:3:"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn duplicate_key_is_refused() {
        let e = err("version: 1\nagents:\n  ada: { roles: [dev] }\n  ada: { roles: [ops] }\n");
        assert!(e.starts_with("r.yaml:4:"), "{e}");
        assert!(e.to_lowercase().contains("duplicate"), "{e}");
    }

    #[test]
    fn undefined_role_and_agent() {
        let e = err("version: 1\nagents:\n  ada: { roles: [developer] }\nwork_types:\n  implement: reviewr\n");
        assert!(e.starts_with("r.yaml:5:14:"), "{e}");
        assert!(e.contains("\"reviewr\"") && e.contains("developer"), "{e}");
        let e = err("version: 1\nagents:\n  ada: { roles: [developer] }\ndefault_agent: bob\n");
        assert!(e.starts_with("r.yaml:4:16:"), "{e}");
        assert!(e.contains("\"bob\""), "{e}");
        let e = err("version: 1\nagents:\n  ada: { roles: [developer] }\ntriggers:\n  - { pattern: \"a.*\", agent: bob }\n");
        assert!(e.starts_with("r.yaml:5:"), "{e}");
        let e = err("version: 1\nagents:\n  ada: { roles: [developer] }\ntriggers:\n  - { pattern: \"a.*\", role: ops }\n");
        assert!(e.contains("role \"ops\""), "{e}");
    }

    #[test]
    fn trigger_needs_exactly_one_target() {
        let e = err("version: 1\nagents:\n  ada: { roles: [dev] }\ntriggers:\n  - { pattern: \"a\", role: dev, agent: ada }\n");
        assert!(e.starts_with("r.yaml:5:"), "{e}");
        assert!(e.contains("exactly one"), "{e}");
    }

    #[test]
    fn bad_values() {
        assert!(err("version: 2\nagents:\n  ada: {}\n").starts_with("r.yaml:1:10:"));
        assert!(err("version: 1\nagents: {}\n").contains("at least one agent"));
        assert!(err("version: 1\nagents:\n  \"a b\": {}\n").contains("must match"));
        assert!(err("version: 1\nagents:\n  ada: { max_in_flight: 0 }\n").starts_with("r.yaml:3:"));
        assert!(err("version: 1\nagents:\n  ada: { max_in_flight: many }\n").starts_with("r.yaml:3:"));
        let e = err("version: 1\nagents:\n  ada: {}\nretry: { backoff: { initial: soon } }\n");
        assert!(e.starts_with("r.yaml:4:") && e.contains("soon"), "{e}");
        assert!(err("version: 1\nagents:\n  ada: {}\nretry: { max_attempts: 0 }\n").contains("max_attempts"));
        assert!(err("version: 1\nagents:\n  ada: {}\nretry: { backoff: { initial: 1m, max: 10s } }\n").starts_with("r.yaml:4:"));
        assert!(err("version: 1\nagents:\n  ada: {}\nretry: { backoff: { factor: 0.5 } }\n").contains("factor"));
        assert!(err("version: 1\nagents: [\n").starts_with("r.yaml:"));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy { max_attempts: 5, initial: Duration::from_secs(10), factor: 2.0, max: Duration::from_secs(30) };
        assert_eq!(p.delay_after(1), Duration::from_secs(10));
        assert_eq!(p.delay_after(2), Duration::from_secs(20));
        assert_eq!(p.delay_after(3), Duration::from_secs(30));
        assert_eq!(p.delay_after(60), Duration::from_secs(30));
    }

    #[test]
    fn load_names_a_missing_file() {
        let e = load(Path::new("/nonexistent/routing.yaml")).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/routing.yaml:"), "{e}");
    }

    /// The fuzz target's property on stable: damaged routing files give errors, not panics,
    /// and every error names the file.
    #[test]
    fn damaged_files_never_panic() {
        use rand::Rng;
        let bytes = GOOD.as_bytes();
        let mut rng = rand::rng();
        let noise = b"{}[]:,-\"'&*!|>#\n \t0aZ";
        for _ in 0..3_000 {
            let mut b = bytes.to_vec();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..b.len());
                match rng.random_range(0..3) {
                    0 => b[i] = noise[rng.random_range(0..noise.len())],
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, noise[rng.random_range(0..noise.len())]),
                }
            }
            if let Ok(text) = std::str::from_utf8(&b)
                && let Err(e) = parse(text, "fuzzed.yaml")
            {
                assert!(e.to_string().starts_with("fuzzed.yaml"), "{e}");
            }
        }
    }
}
