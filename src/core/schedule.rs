//! Schedules (contract v1.6): a cron expression in a time zone, and what to do with firings
//! that nobody ran in time. Pure: the engine gives the database's clock and the schedule's
//! next undecided firing, and this says which firings to submit now, how many were missed,
//! and when the next one is.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::Serialize;

/// How late the newest due firing may be and still count as on time (not missed): a replica
/// that was busy or restarting for less than this fires it; longer, the missed-firing policy
/// decides. The next occurrence coming first makes it missed too.
pub const GRACE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// The most missed firings a schedule may catch up at once.
pub const MAX_CATCH_UP: u32 = 100;
/// A schedule's name: it starts every wp_id of its firings (`{name}-{time}.`), so it is short
/// and has no dot (the part before a wp_id's last dot is its plan).
pub const MAX_NAME: usize = 48;
/// Missed firings counted at most, for the log and the metric (a per-second schedule down for
/// a day would otherwise be counted one by one).
const MAX_COUNTED: u64 = 10_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("schedule name {0:?} must be 1 to {MAX_NAME} of A-Z a-z 0-9 _ -")]
    Name(String),
    #[error("cron expression {expr:?} is invalid: {message}")]
    Cron { expr: String, message: String },
    #[error("cron expression {0:?} never fires")]
    Never(String),
    #[error("time zone {0:?} is unknown; use an IANA name such as Europe/Berlin or UTC")]
    TimeZone(String),
    #[error("missed-firing policy {0:?} is invalid; use skip or catch_up:N (N from 1 to {MAX_CATCH_UP})")]
    Missed(String),
    #[error("overlap policy {0:?} is invalid; use skip or start")]
    Overlap(String),
}

/// What becomes of firings no replica ran in time (every replica down, or the schedule's
/// firings coming faster than they were decided).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    Skip,
    /// The newest N missed firings are submitted late, oldest first; older ones are skipped.
    CatchUp(u32),
}

impl FromStr for Missed {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        let bad = || ScheduleError::Missed(s.chars().take(64).collect());
        match s {
            "skip" => Ok(Missed::Skip),
            _ => {
                let n = s.strip_prefix("catch_up:").or_else(|| s.strip_prefix("catch-up:")).ok_or_else(bad)?;
                match n.trim().parse::<u32>() {
                    Ok(n) if (1..=MAX_CATCH_UP).contains(&n) => Ok(Missed::CatchUp(n)),
                    _ => Err(bad()),
                }
            }
        }
    }
}

impl std::fmt::Display for Missed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missed::Skip => f.write_str("skip"),
            Missed::CatchUp(n) => write!(f, "catch_up:{n}"),
        }
    }
}

/// What a firing does while the previous firing's run is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// It is recorded as skipped and submits nothing.
    Skip,
    /// It is submitted all the same.
    Start,
}

impl FromStr for Overlap {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        match s {
            "skip" => Ok(Overlap::Skip),
            "start" => Ok(Overlap::Start),
            _ => Err(ScheduleError::Overlap(s.chars().take(64).collect())),
        }
    }
}

impl Overlap {
    pub fn as_str(&self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Start => "start",
        }
    }
}

pub fn check_name(name: &str) -> Result<(), ScheduleError> {
    let ok = (1..=MAX_NAME).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(ScheduleError::Name(name.chars().take(64).collect())) }
}

/// A cron expression (five fields, or six with seconds first) read in a time zone.
#[derive(Debug, Clone)]
pub struct Timing {
    cron: Cron,
    tz: Tz,
}

impl Timing {
    pub fn parse(expr: &str, timezone: &str) -> Result<Timing, ScheduleError> {
        let tz = Tz::from_str(timezone).map_err(|_| ScheduleError::TimeZone(timezone.chars().take(64).collect()))?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| ScheduleError::Cron { expr: expr.chars().take(128).collect(), message: e.to_string() })?;
        let timing = Timing { cron, tz };
        if timing.next_after(Utc::now()).is_none() {
            return Err(ScheduleError::Never(expr.chars().take(128).collect()));
        }
        Ok(timing)
    }

    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t.with_timezone(&self.tz), false).ok().map(|d| d.with_timezone(&Utc))
    }

    /// The last firing at or before `t`.
    fn last_until(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&t.with_timezone(&self.tz), true).ok().map(|d| d.with_timezone(&Utc))
    }
}

/// What a schedule does now.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    /// The firings to submit now, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Firings skipped as missed (at most `MAX_COUNTED`: "that many or more").
    pub missed: u64,
    /// The next firing to decide, after `now`.
    pub next: Option<DateTime<Utc>>,
}

/// The firings from `from` (the schedule's first undecided one) up to `now`: the newest is
/// submitted when it is on time (at most `GRACE` late), the others are missed and the policy
/// takes the newest N of them, or none.
pub fn due(timing: &Timing, missed: Missed, from: DateTime<Utc>, now: DateTime<Utc>) -> Due {
    let next = timing.next_after(now);
    let keep = match missed {
        Missed::Skip => 0,
        Missed::CatchUp(n) => n as usize,
    };
    // Newest first, as far back as policy and `from` allow.
    let mut newest = Vec::new();
    let mut cursor = now;
    while newest.len() < keep + 1 {
        match timing.last_until(cursor) {
            Some(t) if t >= from => {
                newest.push(t);
                cursor = t - chrono::TimeDelta::nanoseconds(1);
            }
            _ => break,
        }
    }
    let Some(&latest) = newest.first() else { return Due { fire: Vec::new(), missed: 0, next } };
    let on_time = now - latest <= GRACE;
    let mut fire: Vec<DateTime<Utc>> =
        if on_time { newest.iter().take(keep + 1).copied().collect() } else { newest.iter().take(keep).copied().collect() };
    fire.reverse();
    let mut total = 0u64;
    let mut t = from - chrono::TimeDelta::nanoseconds(1);
    while total < MAX_COUNTED {
        match timing.next_after(t) {
            Some(n) if n <= now => {
                total += 1;
                t = n;
            }
            _ => break,
        }
    }
    Due { missed: total.saturating_sub(fire.len() as u64), fire, next }
}

/// The prefix of a firing's wp_ids: `nightly-20261207T020000Z.`; the part before the dot is
/// also the plan of its work packages.
pub fn prefix(name: &str, fire_at: DateTime<Utc>) -> String {
    format!("{name}-{}.", fire_at.format("%Y%m%dT%H%M%SZ"))
}

/// The longest prefix a schedule's firing gives its wp_ids.
pub const MAX_PREFIX: usize = MAX_NAME + "-20261207T020000Z.".len();

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn minutely() -> Timing {
        Timing::parse("* * * * *", "UTC").unwrap()
    }

    #[test]
    fn parses_policies_and_refuses_the_rest() {
        assert_eq!("skip".parse::<Missed>(), Ok(Missed::Skip));
        assert_eq!("catch_up:3".parse::<Missed>(), Ok(Missed::CatchUp(3)));
        assert_eq!("catch-up:3".parse::<Missed>(), Ok(Missed::CatchUp(3)));
        for bad in ["catch_up:0", "catch_up:101", "catch_up", "all", ""] {
            assert!(bad.parse::<Missed>().is_err(), "{bad}");
        }
        assert_eq!("start".parse::<Overlap>(), Ok(Overlap::Start));
        assert!("queue".parse::<Overlap>().is_err());
        assert!(check_name("nightly_build-2").is_ok());
        for bad in ["", "a.b", "a b", &"x".repeat(MAX_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_bad_cron_and_time_zones() {
        assert!(matches!(Timing::parse("61 * * * *", "UTC"), Err(ScheduleError::Cron { .. })));
        assert!(matches!(Timing::parse("0 2 * * *", "Mars/Olympus"), Err(ScheduleError::TimeZone(_))));
        assert!(Timing::parse("*/5 * * * * *", "Europe/Berlin").is_ok(), "six fields: seconds first");
    }

    #[test]
    fn next_firing_follows_the_time_zone() {
        let berlin = Timing::parse("0 2 * * *", "Europe/Berlin").unwrap();
        // 02:00 in Berlin is 01:00 UTC in winter.
        assert_eq!(berlin.next_after(t("2026-12-07T00:00:00Z")), Some(t("2026-12-07T01:00:00Z")));
        // On the day clocks go forward (29 March 2026), 02:00 does not exist in Berlin.
        let spring = berlin.next_after(t("2026-03-28T02:00:00Z")).unwrap();
        assert!(spring > t("2026-03-28T02:00:00Z"), "{spring}");
    }

    #[test]
    fn an_on_time_firing_fires_alone() {
        let d = due(&minutely(), Missed::Skip, t("2026-12-07T05:01:00Z"), t("2026-12-07T05:01:00.300Z"));
        assert_eq!(d.fire, vec![t("2026-12-07T05:01:00Z")]);
        assert_eq!(d.missed, 0);
        assert_eq!(d.next, Some(t("2026-12-07T05:02:00Z")));
    }

    #[test]
    fn missed_firings_are_skipped_or_the_newest_n_caught_up() {
        // Nobody ran from 05:01 to 05:10:20: ten firings came due, the newest (05:10) on time.
        let (from, now) = (t("2026-12-07T05:01:00Z"), t("2026-12-07T05:10:20Z"));
        let skip = due(&minutely(), Missed::Skip, from, now);
        assert_eq!(skip.fire, vec![t("2026-12-07T05:10:00Z")]);
        assert_eq!(skip.missed, 9);
        let catch = due(&minutely(), Missed::CatchUp(2), from, now);
        assert_eq!(catch.fire, vec![t("2026-12-07T05:08:00Z"), t("2026-12-07T05:09:00Z"), t("2026-12-07T05:10:00Z")]);
        assert_eq!(catch.missed, 7);
        let all = due(&minutely(), Missed::CatchUp(50), from, now);
        assert_eq!(all.fire.len(), 10);
        assert_eq!(all.missed, 0);
    }

    #[test]
    fn a_firing_past_the_grace_is_missed_too() {
        let hourly = Timing::parse("0 * * * *", "UTC").unwrap();
        let (from, now) = (t("2026-12-07T05:00:00Z"), t("2026-12-07T05:30:00Z"));
        let skip = due(&hourly, Missed::Skip, from, now);
        assert!(skip.fire.is_empty());
        assert_eq!(skip.missed, 1);
        assert_eq!(skip.next, Some(t("2026-12-07T06:00:00Z")));
        let catch = due(&hourly, Missed::CatchUp(1), from, now);
        assert_eq!(catch.fire, vec![t("2026-12-07T05:00:00Z")]);
        assert_eq!(catch.missed, 0);
    }

    #[test]
    fn nothing_is_due_before_the_first_firing() {
        let d = due(&minutely(), Missed::CatchUp(3), t("2026-12-07T05:02:00Z"), t("2026-12-07T05:01:30Z"));
        assert!(d.fire.is_empty());
        assert_eq!(d.missed, 0);
    }

    #[test]
    fn a_long_outage_of_a_per_second_schedule_is_counted_with_a_cap() {
        let every_second = Timing::parse("* * * * * *", "UTC").unwrap();
        let d = due(&every_second, Missed::CatchUp(2), t("2026-12-06T05:00:00Z"), t("2026-12-07T05:00:00.5Z"));
        assert_eq!(d.fire, vec![t("2026-12-07T04:59:58Z"), t("2026-12-07T04:59:59Z"), t("2026-12-07T05:00:00Z")]);
        assert_eq!(d.missed, MAX_COUNTED - 3);
    }

    #[test]
    fn the_prefix_names_schedule_and_firing() {
        assert_eq!(prefix("nightly", t("2026-12-07T02:00:00Z")), "nightly-20261207T020000Z.");
        assert_eq!(prefix(&"x".repeat(MAX_NAME), t("2026-12-07T02:00:00Z")).len(), MAX_PREFIX);
    }
}
