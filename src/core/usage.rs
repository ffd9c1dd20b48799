//! Usage and money (contract v1.6), pure: the usage fields of a report, and amounts of USD as
//! exact decimal text. Amounts are never floats: they are checked here as text and added up
//! by PostgreSQL as NUMERIC.

use std::collections::BTreeMap;

use crate::core::entry::{WorkPackageSpec, excerpt};

/// The most digits before the point and after it that an amount may have.
const INT_DIGITS: usize = 12;
const FRACTION_DIGITS: usize = 9;

/// An amount of USD in its canonical text (`25.03`, `0.000125`, `7`): what PostgreSQL reads as
/// NUMERIC. Accepts a plain non-negative decimal with at most 12 digits before the point and 9
/// after it; no sign, exponent or thousands separators, so nothing is rounded.
pub fn parse_usd(s: &str) -> Result<String, String> {
    let t = s.trim();
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (t.contains('.') && frac.is_empty()) {
        return Err(format!("{} is not an amount of USD: write a plain decimal such as 0.0125 or 25", excerpt(s)));
    }
    if int.trim_start_matches('0').len() > INT_DIGITS || frac.len() > FRACTION_DIGITS {
        return Err(format!("{} has more than {INT_DIGITS} digits before the point or {FRACTION_DIGITS} after it", excerpt(s)));
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    Ok(if frac.is_empty() { int.to_string() } else { format!("{int}.{frac}") })
}

/// (v1.6) The plan's budget an incoming entry carries in `budget`, as (plan, USD): only work of
/// a plan may carry one. Err: why the entry is refused (`invalid`).
pub fn budget_of(spec: &WorkPackageSpec) -> Result<Option<(String, String)>, String> {
    let Some(b) = spec.fields.get("budget").filter(|b| !b.trim().is_empty()) else { return Ok(None) };
    let usd = parse_usd(b).map_err(|why| format!("budget {why}"))?;
    match &spec.plan {
        Some(plan) => Ok(Some((plan.clone(), usd))),
        None => Err("budget is a plan's: give the entry a plan (or a wp_id such as run1.build)".into()),
    }
}

/// What a report says it used (v1.6): `usage_input_tokens`, `usage_output_tokens`,
/// `usage_cost` (USD) and `usage_model`, each optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    /// Canonical decimal text (see `parse_usd`).
    pub cost: Option<String>,
    pub model: Option<String>,
}

/// The field names of usage on a report.
pub const FIELDS: [&str; 4] = ["usage_input_tokens", "usage_output_tokens", "usage_cost", "usage_model"];

/// The usage of a report: None when it carries none; Err with a sentence a person can act on
/// when a usage field is malformed (the report still applies; its usage is dead-lettered).
pub fn parse(fields: &BTreeMap<String, String>) -> Result<Option<Usage>, String> {
    let get = |k: &str| fields.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    if FIELDS.iter().all(|k| get(k).is_none()) {
        return Ok(None);
    }
    let tokens = |k: &str| -> Result<Option<i64>, String> {
        match get(k) {
            None => Ok(None),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if (0..=1_000_000_000_000).contains(&n) => Ok(Some(n)),
                _ => Err(format!("{k} {} must be a whole number of tokens from 0 to 10^12", excerpt(v))),
            },
        }
    };
    let cost = get("usage_cost").map(parse_usd).transpose().map_err(|e| format!("usage_cost {e}"))?;
    let model = match get("usage_model") {
        Some(m) if m.len() > 128 => return Err(format!("usage_model {} is longer than 128 bytes", excerpt(m))),
        Some(m) => Some(m.to_string()),
        None => None,
    };
    Ok(Some(Usage { input_tokens: tokens("usage_input_tokens")?, output_tokens: tokens("usage_output_tokens")?, cost, model }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_exact_decimal_text() {
        assert_eq!(parse_usd("25.00").unwrap(), "25");
        assert_eq!(parse_usd(" 0.0125 ").unwrap(), "0.0125");
        assert_eq!(parse_usd("007.10").unwrap(), "7.1");
        assert_eq!(parse_usd("0").unwrap(), "0");
        for bad in ["", "-1", "1e3", "1,000", ".5", "5.", "abc", "1.1234567891", "1234567890123", "NaN", "+2"] {
            assert!(parse_usd(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usage_fields_are_checked_and_absent_usage_is_none() {
        let f = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        assert_eq!(parse(&f(&[("result", "x")])).unwrap(), None);
        let u = parse(&f(&[("usage_input_tokens", "1200"), ("usage_cost", "0.0300"), ("usage_model", "m-1")])).unwrap().unwrap();
        assert_eq!((u.input_tokens, u.output_tokens, u.cost.as_deref(), u.model.as_deref()), (Some(1200), None, Some("0.03"), Some("m-1")));
        let e = parse(&f(&[("usage_cost", "lots")])).unwrap_err();
        assert!(e.starts_with("usage_cost \"lots\""), "{e}");
        assert!(parse(&f(&[("usage_output_tokens", "-3")])).unwrap_err().contains("usage_output_tokens"));
    }

    #[test]
    fn a_budget_on_an_entry_is_a_plan_s_and_exact() {
        let spec = |wp: &str, plan: Option<&str>, budget: &str| WorkPackageSpec {
            wp_id: wp.into(),
            plan: plan.map(str::to_string),
            fields: [("budget".to_string(), budget.to_string())].into(),
            ..WorkPackageSpec::default()
        };
        assert_eq!(budget_of(&spec("n.a", Some("n"), "25.00")).unwrap(), Some(("n".into(), "25".into())));
        assert_eq!(budget_of(&spec("n.a", Some("n"), " ")).unwrap(), None);
        assert!(budget_of(&spec("n.a", Some("n"), "lots")).unwrap_err().starts_with("budget \"lots\""));
        assert!(budget_of(&spec("solo", None, "3")).unwrap_err().contains("give the entry a plan"));
    }
}
