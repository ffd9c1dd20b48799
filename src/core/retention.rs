//! Retention policies as an operator writes them: how long finished work packages stay in
//! PostgreSQL (`GE_RETENTION`), and how much of an agent's trigger stream may stay unread
//! (`GE_TRIGGER_MAX_AGE`, `GE_TRIGGER_MAX_LEN`, and per agent `GE_TRIGGER_RETENTION`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The longest period a policy may name: far beyond any sensible value, and short enough that
/// subtracting it from a stream id's milliseconds cannot underflow.
const MAX_PERIOD: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A period that may be "never": `0`, `off` and `never` keep things for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Period(pub Option<Duration>);

impl Period {
    pub fn parse(s: &str) -> Result<Period, String> {
        match s.trim() {
            "0" | "off" | "never" => Ok(Period(None)),
            t => {
                let d = humantime::parse_duration(t).map_err(|e| format!("{e} (a duration like 30s, 1h, 7days; 0 or off for never)"))?;
                if d.is_zero() {
                    Ok(Period(None))
                } else if d > MAX_PERIOD {
                    Err(format!("must be at most {} days", MAX_PERIOD.as_secs() / 86_400))
                } else {
                    Ok(Period(Some(d)))
                }
            }
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("never"),
            Some(d) => write!(f, "{}", humantime::format_duration(d)),
        }
    }
}

/// How much of one trigger stream is kept beyond what every reader has acknowledged:
/// entries older than `max_age`, and those beyond the newest `max_len`, are removed even
/// when an agent has not read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TriggerPolicy {
    pub max_age: Period,
    pub max_len: Option<u64>,
}

impl fmt::Display for TriggerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.max_age.0, self.max_len) {
            (None, None) => f.write_str("unread kept for ever"),
            (_, None) => write!(f, "unread kept {}", self.max_age),
            (None, Some(n)) => write!(f, "unread kept up to {n} entries"),
            (_, Some(n)) => write!(f, "unread kept {} and up to {n} entries", self.max_age),
        }
    }
}

/// A number of entries, or no cap (`off`, `0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaxLen(pub Option<u64>);

impl MaxLen {
    pub fn parse(s: &str) -> Result<MaxLen, String> {
        parse_len(s).map(MaxLen)
    }
}

fn parse_len(s: &str) -> Result<Option<u64>, String> {
    match s.trim() {
        "0" | "off" | "never" | "" => Ok(None),
        t => t.parse::<u64>().map(Some).map_err(|_| format!("{t:?} is not a number of entries (or off)")),
    }
}

/// Per-agent overrides: `ada=30d,turing=1h/50000,hopper=off/1000`. Each value is
/// `AGE[/LEN]`, either part `off`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentPolicies(pub BTreeMap<String, TriggerPolicy>);

impl AgentPolicies {
    pub fn parse(s: &str) -> Result<AgentPolicies, String> {
        let mut out = BTreeMap::new();
        for (i, item) in s.split(',').map(str::trim).filter(|t| !t.is_empty()).enumerate() {
            let at = format!("item {} ({item:?})", i + 1);
            let (agent, spec) = item.split_once('=').ok_or_else(|| format!("{at}: expected AGENT=AGE[/LEN]"))?;
            let agent = agent.trim();
            if agent.is_empty() {
                return Err(format!("{at}: the agent name is empty"));
            }
            let (age, len) = match spec.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (spec, None),
            };
            let max_age = Period::parse(age).map_err(|e| format!("{at}: age {e}"))?;
            let max_len = match len {
                Some(l) => parse_len(l).map_err(|e| format!("{at}: length {e}"))?,
                None => None,
            };
            if out.insert(agent.to_string(), TriggerPolicy { max_age, max_len }).is_some() {
                return Err(format!("{at}: agent {agent} is named twice"));
            }
        }
        Ok(AgentPolicies(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_off_and_never_mean_for_ever() {
        for s in ["0", "off", "never", "0s"] {
            assert_eq!(Period::parse(s), Ok(Period(None)), "{s}");
        }
        assert_eq!(Period::parse("7days"), Ok(Period(Some(Duration::from_secs(7 * 86_400)))));
        assert!(Period::parse("soon").unwrap_err().contains("0 or off for never"));
        assert!(Period::parse("100000days").unwrap_err().contains("at most"));
    }

    #[test]
    fn agent_overrides_name_the_item_that_is_wrong() {
        let p = AgentPolicies::parse("ada=30d, turing=1h/50000,hopper=off/1000").unwrap();
        assert_eq!(p.0["ada"], TriggerPolicy { max_age: Period(Some(Duration::from_secs(30 * 86_400))), max_len: None });
        assert_eq!(p.0["turing"], TriggerPolicy { max_age: Period(Some(Duration::from_secs(3600))), max_len: Some(50_000) });
        assert_eq!(p.0["hopper"], TriggerPolicy { max_age: Period(None), max_len: Some(1000) });
        assert_eq!(AgentPolicies::parse(""), Ok(AgentPolicies::default()));
        let e = AgentPolicies::parse("ada=1h,turing").unwrap_err();
        assert!(e.contains("item 2") && e.contains("AGENT=AGE"), "{e}");
        let e = AgentPolicies::parse("ada=1h/lots").unwrap_err();
        assert!(e.contains("item 1") && e.contains("lots"), "{e}");
        assert!(AgentPolicies::parse("ada=1h,ada=2h").unwrap_err().contains("twice"));
    }
}
